"""``natedit lab`` end to end, as a user runs it: a subprocess, real peers, then nothing left.

The run builds its namespaces (``nelab<pid><hex>-*``), runs natedit's worker, pptpd
and pptp-linux clients forced onto one Call ID, shows the call table and metrics,
prints a summary and removes everything; interrupted by SIGTERM or SIGINT it still
summarises and removes everything. What is left afterwards is checked by name: no
namespace, no temp dir, no process whose command line names the run's prefix.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from natedit.lab import demo
from natedit.lab.topology import REQUIRED_COMMANDS
from tests.harness import require_netns
from tests.netns.test_systemd import require_nobody_can_run_natedit

LAB_BOUND = 20.0
"""Seconds ``natedit lab --clients 3 --duration 8`` may take, start to clean exit."""


def natedit_lab(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "natedit", "lab", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def prefix_of(output: str) -> str:
    found = re.search(r"\(namespaces (nelab\w+)-\*\)", output)
    assert found, output
    return found.group(1)


def assert_nothing_left(prefix: str, output: str) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in netns, output
    assert not list(Path("/tmp").glob(f"{prefix}-*")), output
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            assert prefix.encode() not in cmdline, (entry.name, cmdline, output)


@pytest.mark.netns
def test_lab_runs_end_to_end_and_leaves_nothing() -> None:
    require_netns()
    t0 = time.monotonic()
    proc = natedit_lab("--clients", "3", "--duration", "8")
    output, _ = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 0, output
    assert took < LAB_BOUND, (took, output)
    prefix = prefix_of(output)
    assert_nothing_left(prefix, output)
    # progress: every step with its time
    for n in range(1, 5):
        assert re.search(rf"^\[{n}/5\] .* \.\.\. done \(\d+\.\d s\)$", output, re.M), output
    assert "natedit: ready pid=" in output and "public_address=198.51.100.1" in output
    # the live call table, several times: three calls, one private Call ID, three public ones
    views = output.count("natedit calls (in the gateway namespace)")
    assert views >= 2, output
    rows = re.findall(r"^ +(10\.0\.0\.1[123]) +0x1234 +198\.51\.100\.2 +(0x[0-9a-f]{4}) "
                      r"+198\.51\.100\.1 +(0x[0-9a-f]{4}) +established$", output, re.M)
    assert len(rows) == 3 * views, output
    assert len({public for _, _, public in rows}) == 3, output
    # the metrics excerpt
    assert 'natedit_calls{state="established"} 3.0' in output, output
    assert "natedit_calls_mapped_total 3.0" in output, output
    inbound = re.findall(r'natedit_gre_packets_total\{direction="inbound"\} (\d+)', output)
    assert int(inbound[-1]) > 100, output
    # the summary: every frame home, none to another client
    summary = output.split("=== summary")[1]
    clients = re.findall(r"^ +c(\d) +10\.0\.0\.\d+ +0x1234 +(0x[0-9a-f]{4}) +(\d+) +(\d+) +(\d+)$",
                         summary, re.M)
    assert len(clients) == 3, output
    for _, _, sent, returned, foreign in clients:
        assert int(sent) > 100 and returned == sent and foreign == "0", output
    assert "all 3 calls clean" in summary and "(foreign): 0" in summary, output
    assert summary.count("event=call_mapped") == 3, output
    assert re.search(r"removing the lab .* done \(\d+\.\d s\)$", output, re.M), output


@pytest.mark.netns
@pytest.mark.parametrize(("sig", "when"), [(signal.SIGTERM, "[5/5] frames flowing"),
                                           (signal.SIGINT, "natedit lab: 2 pptp-linux clients")],
                         ids=["sigterm-while-flowing", "sigint-while-building"])
def test_lab_interrupted_removes_everything(sig: int, when: str) -> None:
    require_netns()
    proc = natedit_lab("--clients", "2", "--duration", "0")
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 30
    while when not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    if when.endswith("flowing"):
        time.sleep(1.0)  # some frames
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=30)
    output = seen + rest
    assert proc.returncode == 128 + sig, output
    assert f"natedit lab: {signal.Signals(sig).name}: stopped; the lab is removed" in output
    if when.endswith("flowing"):
        assert "=== summary" in output and "(foreign): 0" in output, output
        assert re.search(r"removing the lab .* done", output), output
    assert_nothing_left(prefix_of(output), output)


def test_missing_packages_named_for_apt() -> None:
    absent = {"pptp", "pptpd", "pptpctrl", "nsenter"}
    assert demo.missing_packages(lambda cmd: None if cmd in absent else f"/usr/bin/{cmd}") == [
        "pptp-linux", "pptpd", "util-linux"]
    assert demo.missing_packages(lambda cmd: f"/usr/bin/{cmd}") == []
    assert set(demo.PACKAGES) >= {*REQUIRED_COMMANDS, "iptables-save", "iptables-restore"}


def test_missing_packages_stop_the_lab(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "which", lambda cmd: None if cmd == "pptp" else f"/x/{cmd}")
    assert demo.main() == 1
    err = capsys.readouterr().err
    assert "natedit lab: missing Debian packages; install them with:\n" \
           "  apt-get install pptp-linux\n" in err


def test_not_root() -> None:
    """As nobody: one clear line, exit 1, nothing built."""
    if os.geteuid() == 0:
        require_nobody_can_run_natedit()
    if os.geteuid() != 0:
        proc = subprocess.run([sys.executable, "-m", "natedit", "lab"], capture_output=True,
                              text=True, timeout=30)
    else:
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-m", "natedit", "lab"],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert "natedit lab needs root: it creates network namespaces" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.netns
def test_lab_port_forward_leaves_the_published_servers_calls_alone() -> None:
    """``natedit lab --port-forward``: beside natedit's two inside clients, an inside pptpd
    published by DNAT is called by 2 outside clients and 2 behind one remote NAT; every
    call is clean, natedit maps only its own 2, and nothing is left afterwards."""
    require_netns()
    proc = natedit_lab("--clients", "2", "--duration", "3", "--port-forward")
    output, _ = proc.communicate(timeout=60)
    assert_nothing_left(prefix_of(output), output)
    assert "published on 198.51.100.1 by DNAT" in output, output
    assert proc.returncode == 0, output
    rows = re.findall(r"^ +(oc1|oc2|rc1|rc2) +[0-9.]+ +0x1234 +- +(\d+) +(\d+) +0$",
                      output, re.M)
    assert sorted(name for name, _, _ in rows) == ["oc1", "oc2", "rc1", "rc2"], output
    assert all(sent == back and int(sent) > 0 for _, sent, back in rows), output
    assert "natedit_calls_mapped_total 2.0" in output, output
    assert "not natedit's: they passed through the operator's DNAT" in output, output
