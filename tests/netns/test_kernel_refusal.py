"""``datapath: kernel`` where it cannot run: one clear line, and userspace keeps working.

The real worker in a gateway namespace of our own (no peers needed: it refuses
before any traffic). What is missing is made so for real where a test can:

* BPF not permitted: the worker runs as root without CAP_BPF and CAP_SYS_ADMIN
  (``setpriv --bounding-set``, CAP_NET_ADMIN kept, so its queues and rules still
  work): ``datapath: kernel`` refuses to start with one line naming the missing
  capability, leaving no rule and no tc object behind; with the same
  capabilities ``datapath: userspace`` starts, and a reload to ``kernel`` is
  refused with the same line while the worker keeps running on userspace;
* no clsact qdisc (sch_ingress) or no cls_bpf in the kernel: a kernel without
  them cannot be made in a namespace, so ``tc`` on the worker's PATH answers
  what iproute2 prints on such a kernel; the worker names the missing part in
  one line and removes what it had added (its clsact, its pins).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from natedit.lab.netns import Netns, Port, Route, Topology, Veth
from tests.conftest import require, require_tool

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
NET = Topology(
    nodes=("in", "gw", "out"),
    links=(Veth(Port("gw", "in0", "10.0.0.1/24"), Port("in", "eth0", "10.0.0.11/24")),
           Veth(Port("gw", "out0", "198.51.100.1/24"), Port("out", "eth0", "198.51.100.2/24"))),
    routes=(Route("in", "default", "10.0.0.1"), Route("gw", "default", "198.51.100.2")),
    forwarding=("gw",),
)
NO_BPF = ["setpriv", "--bounding-set", "-bpf,-sys_admin,-perfmon"]
"""Root without the capabilities BPF needs (CAP_NET_ADMIN and the rest kept)."""
NOT_PERMITTED = ("natedit: error: datapath kernel: BPF is not permitted: the worker lacks "
                 "CAP_BPF (or CAP_SYS_ADMIN) (datapath: userspace works without it)")
FAKE_TC = """#!/bin/sh
# iproute2's answer on a kernel without {what}; anything else is the real tc
case " $* " in *{match}*) echo "{error}" >&2; exit 2;; esac
exec {tc} "$@"
"""
MISSING = {
    "clsact": ('" qdisc add "*" clsact "', "Error: Specified qdisc kind is unknown.",
               "natedit: error: datapath kernel needs the clsact qdisc (sch_ingress, "
               "CONFIG_NET_SCH_INGRESS) on {dev}: tc qdisc add: Error: Specified qdisc kind "
               "is unknown. (datapath: userspace works without it)"),
    "cls_bpf": ('" filter replace "*" bpf "', "Error: TC classifier not found.",
                "natedit: error: datapath kernel needs cls_bpf (CONFIG_NET_CLS_BPF) on {dev}: "
                "tc filter replace: Error: TC classifier not found. (datapath: userspace "
                "works without it)"),
}


def _prerequisites() -> None:
    require(os.geteuid() == 0, "needs root for network namespaces and BPF")
    for tool in ("ip", "tc", "bpftool", "clang", "setpriv", "iptables-save"):
        require_tool(tool)


def tc_state(net: Netns) -> str:
    """The gateway's qdiscs and ingress filters (what natedit may have left)."""
    gw = net.name("gw")
    out = [net.exec(gw, ["tc", "qdisc", "show"]).stdout]
    for dev in ("in0", "out0"):
        out.append(net.exec(gw, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout)
    return "".join(out)


def run_worker(net: Netns, tmp: Path, datapath: str, prefix: list[str],
               env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    policy = tmp / "policy.yaml"
    policy.write_text(f"datapath: {datapath}\n")
    return subprocess.run(
        net.argv(net.name("gw"), [*prefix, sys.executable, "-m", "natedit", "run", "--policy",
                                  str(policy), "--state", "", "--ready-file",
                                  str(tmp / "ready")]),
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60)


def env_for(tmp: Path, path: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NATEDIT_BPF_CACHE": str(tmp / "bpf")}
    if path is not None:
        env["PATH"] = f"{path}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


def test_bpf_not_permitted_refuses_the_kernel_datapath_and_userspace_keeps_working(
        tmp_path: Path) -> None:
    _prerequisites()
    env = env_for(tmp_path)
    with Netns(NET) as net:
        gw = net.name("gw")
        rules_before, tc_before = net.exec(gw, ["iptables-save"]).stdout, tc_state(net)
        refused = run_worker(net, tmp_path, "kernel", NO_BPF, env)
        rules_after, tc_after = net.exec(gw, ["iptables-save"]).stdout, tc_state(net)

        # the same capabilities, datapath: userspace; then a reload asks for kernel
        policy = tmp_path / "policy.yaml"
        policy.write_text("datapath: userspace\n")
        ready = tmp_path / "ready"
        worker = subprocess.Popen(
            net.argv(gw, [*NO_BPF, sys.executable, "-m", "natedit", "run", "--policy",
                          str(policy), "--state", "", "--ready-file", str(ready)]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=str(REPO))
        try:
            deadline = time.monotonic() + 30
            while not ready.exists() and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            started = ready.exists()
            policy.write_text("datapath: kernel\n")
            reload = subprocess.run(net.argv(gw, [sys.executable, "-m", "natedit", "reload",
                                                  "--ready-file", str(ready)]),
                                    capture_output=True, text=True, env=env, cwd=str(REPO),
                                    timeout=30)
            status = json.loads(ready.read_text()) if ready.exists() else {}
            alive = worker.poll() is None
            tc_running = tc_state(net)
            worker.send_signal(signal.SIGTERM)
            rc = worker.wait(15)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert worker.stdout is not None
        log = worker.stdout.read()
        rules_end = net.exec(gw, ["iptables-save"]).stdout
    info = f"refused: {refused!r}\nreload: {reload!r}\nstatus: {status}\nlog:\n{log}"
    # kernel: refused at start, one line naming what is missing, nothing left behind
    assert refused.returncode == 1, info
    assert refused.stderr.strip().splitlines() == [NOT_PERMITTED], info
    assert rules_after == rules_before and tc_after == tc_before, info
    # userspace: runs with the same capabilities; the reload to kernel is refused, the
    # worker goes on in userspace and stops cleanly
    assert started and alive and rc == 0, info
    assert reload.returncode != 0, info
    assert NOT_PERMITTED.removeprefix("natedit: error: ") in reload.stderr + log, info
    assert status["policy"]["reloads_failed"] == 1, info
    assert "natedit_gre" not in tc_running and rules_end == rules_before, info


@pytest.mark.parametrize("missing", list(MISSING))
def test_a_kernel_without_clsact_or_cls_bpf_is_named(tmp_path: Path, missing: str) -> None:
    _prerequisites()
    match, error, line = MISSING[missing]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "tc").write_text(FAKE_TC.format(what=missing, match=match, error=error,
                                            tc=subprocess.run(["sh", "-c", "command -v tc"],
                                                              capture_output=True, text=True,
                                                              check=True).stdout.strip()))
    (fake / "tc").chmod(0o755)
    env = env_for(tmp_path, str(fake))
    with Netns(NET) as net:
        gw = net.name("gw")
        rules_before, tc_before = net.exec(gw, ["iptables-save"]).stdout, tc_state(net)
        refused = run_worker(net, tmp_path, "kernel", [], env)
        rules_after, tc_after = net.exec(gw, ["iptables-save"]).stdout, tc_state(net)
        (tmp_path / "user.yaml").write_text("datapath: userspace\n")
        works = subprocess.Popen(
            net.argv(gw, [sys.executable, "-m", "natedit", "run", "--policy",
                          str(tmp_path / "user.yaml"), "--state", "", "--ready-file",
                          str(tmp_path / "user.ready")]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=str(REPO))
        try:
            deadline = time.monotonic() + 30
            while (not (tmp_path / "user.ready").exists() and works.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            started = (tmp_path / "user.ready").exists()
            works.send_signal(signal.SIGTERM)
            rc = works.wait(15)
        finally:
            if works.poll() is None:
                works.kill()
                works.wait()
    info = f"refused: {refused!r}\ntc before:\n{tc_before}\ntc after:\n{tc_after}"
    assert refused.returncode == 1, info
    [said] = refused.stderr.strip().splitlines()
    assert said in {line.format(dev=dev) for dev in ("in0", "out0")}, info
    assert rules_after == rules_before and tc_after == tc_before, info  # its clsact went too
    assert started and rc == 0, info
