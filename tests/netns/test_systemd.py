"""deploy/systemd/natedit.service: systemd accepts it, and the worker runs as it confines it.

``systemd-analyze verify`` checks a copy whose ExecStart names the venv's
``natedit`` (verify wants the binary to exist). systemd does not run here
(no PID 1 of its own), so the confinement the unit asks for is reproduced
around a real worker in a network namespace of the test's own: uid 0 with
only CAP_NET_ADMIN and CAP_NET_RAW (bounding, permitted, effective),
no_new_privs, and no writable-and-executable memory (the kernel's
PR_SET_MDWE, what MemoryDenyWriteExecute= asks for). The worker must start,
install its rules, bind its queues, report them bound in its metrics,
reload on SIGHUP, and remove its rules at SIGTERM; ``natedit cleanup`` must
work with the same capabilities (ExecStopPost). The same worker as an
unprivileged user with those capabilities as ambient ones also runs, but
cannot read the kernel's queue figures (``/proc/net/netfilter/nfnetlink_queue``
is 0440 root): the measured reason the unit keeps uid 0.

Not reproduced here: ProtectSystem= and the other mount options, the system
call filter and the address-family restriction (checked by systemd-analyze
only).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natedit import host, reload, state
from tests.conftest import require, require_tool
from tests.scratch_ns import LONE_GATEWAY, Namespace, require_scratch_ns, scratch_namespaces

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "natedit.service"
INSTALLED_BIN = "/usr/local/bin/natedit"
"""Where deploy/install.sh puts the command, and the unit runs it from."""
NATEDIT_BIN = Path(sys.executable).parent / "natedit"
CAPS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
CONFINED = (
    "import ctypes, runpy, sys\n"
    f"assert ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
    "sys.argv[0] = 'natedit'\n"
    "runpy.run_module('natedit', run_name='__main__', alter_sys=True)\n"
)
"""``python -c CONFINED run ...``: natedit, every module imported after W+X memory is
refused (and for the programs it runs: the flag is kept across exec)."""
NOBODY = 65534


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    exe = require_tool("systemd-analyze")
    return subprocess.run([exe, "verify", str(path)], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    copy = tmp_path / "natedit.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(NATEDIT_BIN)))
    done = verify(copy)
    assert done.returncode == 0 and not done.stdout and not done.stderr, done


def test_systemd_analyze_verify_rejects_a_missing_binary(tmp_path: Path) -> None:
    """The check above means something: verify fails when ExecStart names nothing."""
    copy = tmp_path / "natedit.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(tmp_path / "none")))
    done = verify(copy)
    assert done.returncode != 0 and "none" in done.stderr, done


def test_unit_asks_for_what_the_worker_needs_and_no_more() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"  # the worker sends READY=1
    assert service["Restart"] == "on-failure"
    assert set(service["CapabilityBoundingSet"].split()) == set(CAPS)
    assert set(service["AmbientCapabilities"].split()) == set(CAPS)
    assert "User" not in service and "DynamicUser" not in service  # uid 0: see the docstring
    start = service["ExecStart"].split()
    assert start[:2] == [INSTALLED_BIN, "run"]
    options = dict(zip(start[2::2], start[3::2], strict=True))
    assert options == {"--policy": "/etc/natedit/policy.yaml",
                       "--pid-file": reload.DEFAULT_PID_FILE,
                       "--state": state.DEFAULT_STATE_FILE}
    # rules kept after a crash (for the restart), removed after any other stop
    stop_post = service["ExecStopPost"]
    assert stop_post.startswith("/bin/sh -c ") and f"exec {INSTALLED_BIN} cleanup" in stop_post
    assert "exit-code|signal|core-dump|watchdog) ;;" in stop_post
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (service["StateDirectory"], service["RuntimeDirectory"]) == ("natedit", "natedit")
    assert Path(state.DEFAULT_STATE_FILE).parent == Path("/var/lib/natedit")
    assert Path(reload.DEFAULT_PID_FILE).parent == Path("/run/natedit")
    assert set(service["ReadWritePaths"].split()) == {"/var/lib/natedit", "/run/natedit"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "RestrictNamespaces", "MemoryDenyWriteExecute", "LockPersonality"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET",
                                                                "AF_NETLINK"}


# -- the worker, confined as the unit confines it --------------------------------------------


@pytest.fixture
def gateway() -> Iterator[Namespace]:
    """A namespace with a public address and a default route: natedit's built-in policy
    finds its public address there."""
    require_scratch_ns()
    require_tool("setpriv")
    with scratch_namespaces(topology=LONE_GATEWAY) as (gw,):
        yield gw


def confined(user: str) -> list[str]:
    caps = ",".join(f"+{name.removeprefix('CAP_').lower()}" for name in CAPS)
    argv = ["setpriv", "--no-new-privs", f"--bounding-set=-all,{caps}"]
    if user == "nobody":
        argv += [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}"]
    return [*argv, sys.executable, "-c", CONFINED]


def status_caps(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", text, re.M)}


def metrics(gw: Namespace) -> str:
    fetch = ("import urllib.request; print(urllib.request.urlopen("
             "'http://127.0.0.1:9723/metrics', timeout=5).read().decode())")
    return gw.run([sys.executable, "-c", fetch])


@pytest.mark.netns
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_worker_runs_with_only_the_units_capabilities(gateway: Namespace, user: str) -> None:
    gw = gateway
    if user == "nobody":
        require_nobody_can_run_natedit()
    with workdir(NOBODY if user == "nobody" else 0) as tmp:
        run_confined(gw, user, tmp)


@contextlib.contextmanager
def workdir(owner: int) -> Iterator[Path]:
    """A directory the worker's user can reach (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="natedit-systemd-"))
    try:
        path.chmod(0o755)
        os.chown(path, owner, -1)
        yield path
    finally:
        shutil.rmtree(path)


def run_confined(gw: Namespace, user: str, tmp_path: Path) -> None:
    ready, pid_file, log = tmp_path / "ready", tmp_path / "natedit.pid", tmp_path / "log"
    before = gw.iptables_save()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            gw.argv([*confined(user), "run", "--ready-file", str(ready), "--pid-file",
                     str(pid_file), "--state", str(tmp_path / "state.db")]),
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        caps = status_caps(proc.pid)
        wanted = sum(1 << bit for bit in CAPS.values())
        assert (caps["CapEff"], caps["CapPrm"], caps["CapBnd"]) == (wanted,) * 3, caps
        assert "NATEDIT-FORWARD" in gw.iptables_save()
        page = metrics(gw)
        bound = re.findall(r'^natedit_queue_bound\{direction="\w+",queue="\d+"\} (\S+)$',
                           page, re.M)
        # uid 0 reads the kernel's queue figures; another user cannot (0440 root)
        assert bound == (["1.0", "1.0"] if user == "root" else ["0.0", "0.0"]), page
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "policy reloaded from built-in default" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
    assert rc == 0, log.read_text()
    assert "stopped; rules removed" in log.read_text()
    assert gw.iptables_save() == before
    # ExecStopPost: natedit cleanup, with the same capabilities, after a stop that left rules
    gw.run(["iptables", "-t", "mangle", "-N", "NATEDIT-FORWARD"])  # what a crash leaves
    gw.run(["iptables", "-t", "mangle", "-I", "FORWARD", "1", "-j", "NATEDIT-FORWARD"])
    done = subprocess.run(gw.argv([*confined(user), "cleanup"]), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "NATEDIT" not in gw.iptables_save()


def require_nobody_can_run_natedit() -> None:
    """User nobody must be able to run this venv's natedit (under CI=true a failure)."""
    probe = subprocess.run([*confined("nobody"), "--help"], capture_output=True, text=True,
                           timeout=30)
    require(probe.returncode == 0,
            f"user nobody cannot run this venv's natedit: {probe.stderr[-300:]}")


def test_run_without_net_admin_is_refused() -> None:
    """Not root and no CAP_NET_ADMIN: one line, exit 1, nothing touched."""
    require_tool("setpriv")
    require_nobody_can_run_natedit()
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "--inh-caps=-all", sys.executable, "-m", "natedit",
                           "run", "--state", "", "--pid-file", ""],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == ("natedit: error: natedit run needs root or CAP_NET_ADMIN "
                           "(deploy/systemd/natedit.service): it installs firewall rules and "
                           "binds netfilter queues\n")



def test_has_capability_reads_the_effective_set() -> None:
    status = "Name:\tpython\nCapPrm:\t0000000000003000\nCapEff:\t0000000000001000\n"
    assert host.has_capability(host.CAP_NET_ADMIN, status)
    assert not host.has_capability(13, status)  # CAP_NET_RAW permitted, not effective
    assert not host.has_capability(host.CAP_NET_ADMIN, "CapEff:\t0000000000000000\n")
