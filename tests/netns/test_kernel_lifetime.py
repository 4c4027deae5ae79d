"""The kernel datapath's lifetime: nothing of it outlives the worker.

The real worker (``datapath: kernel``) in a gateway namespace of our own, no
peers (the tc-BPF program is attached at start, calls or none). After every
kind of stop, SIGTERM (clean), SIGUSR2 (stop for a restart: the rules stay, the
program does not) and SIGKILL (the guard process removes it), the program and
each of its maps are gone from the kernel (by id, as bpftool sees them), and so
are natedit's tc filter and the clsact qdisc it added. When the worker and its
guard are both killed (a whole service cgroup, say), the filter stays, and the
program with it, translating from maps no one keeps: ``natedit cleanup``
removes it, and then program and maps are gone too.
(A restart with the state file fills the maps before the program is attached:
tests/netns/test_e2e_natedit.py::test_worker_restart_during_traffic.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natedit.lab.netns import Netns, Port, Route, Topology, Veth
from tests.conftest import require, require_tool
from tests.harness.kernel import attached

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
NET = Topology(
    nodes=("in", "gw", "out"),
    links=(Veth(Port("gw", "in0", "10.0.0.1/24"), Port("in", "eth0", "10.0.0.11/24")),
           Veth(Port("gw", "out0", "198.51.100.1/24"), Port("out", "eth0", "198.51.100.2/24"))),
    routes=(Route("in", "default", "10.0.0.1"), Route("gw", "default", "198.51.100.2")),
    forwarding=("gw",),
)


@pytest.fixture
def net() -> Iterator[Netns]:
    require(os.geteuid() == 0, "needs root for network namespaces and BPF")
    for tool in ("ip", "tc", "bpftool", "clang"):
        require_tool(tool)
    with Netns(NET) as n:
        yield n


def start(net: Netns, tmp: Path) -> tuple[subprocess.Popen[str], dict[str, int], list[int]]:
    """A kernel-datapath worker, ready; its program's interfaces -> id, and its map ids."""
    policy, ready = tmp / "policy.yaml", tmp / "ready"
    policy.write_text("datapath: kernel\n")
    ready.unlink(missing_ok=True)
    worker = subprocess.Popen(
        net.argv(net.name("gw"), [sys.executable, "-m", "natedit", "run", "--policy",
                                  str(policy), "--state", "", "--ready-file", str(ready)]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO))
    deadline = time.monotonic() + 60
    while not ready.exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            raise AssertionError(f"worker not ready:\n{worker.communicate()[0]}")
        time.sleep(0.05)
    progs = attached(net.exec, net.name("gw"))
    assert sorted(progs) == ["in0", "out0"] and len(set(progs.values())) == 1, progs
    info = json.loads(net.exec(net.name("gw"), ["bpftool", "-j", "prog", "show", "id",
                                                str(min(progs.values()))]).stdout)
    return worker, progs, list(info["map_ids"])


def alive(net: Netns, prog_id: int, map_ids: list[int]) -> list[str]:
    """Which of the program and maps still exist in the kernel."""
    gw = net.name("gw")
    left = []
    if net.exec(gw, ["bpftool", "prog", "show", "id", str(prog_id)], check=False).returncode == 0:
        left.append(f"prog {prog_id}")
    for m in map_ids:
        if net.exec(gw, ["bpftool", "map", "show", "id", str(m)], check=False).returncode == 0:
            left.append(f"map {m}")
    return left


def gone_soon(net: Netns, prog_id: int, map_ids: list[int], timeout: float = 5.0) -> list[str]:
    """What is still there once everything is gone, or at the timeout (the kernel frees
    programs and maps after an RCU grace period)."""
    deadline = time.monotonic() + timeout
    while (left := alive(net, prog_id, map_ids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def qdiscs(net: Netns) -> str:
    return net.exec(net.name("gw"), ["tc", "qdisc", "show"]).stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2, signal.SIGKILL],
                         ids=["sigterm", "sigusr2", "sigkill"])
def test_every_stop_removes_the_program_and_its_maps(net: Netns, tmp_path: Path,
                                                     sig: int) -> None:
    worker, progs, map_ids = start(net, tmp_path)
    prog_id = min(progs.values())
    try:
        there = alive(net, prog_id, map_ids)
        assert len(map_ids) == 2 and len(there) == 3, there
        worker.send_signal(sig)
        rc = worker.wait(15)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    log = worker.communicate()[0]
    left = gone_soon(net, prog_id, map_ids)
    info = f"rc {rc}\n{log}"
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0), info
    assert left == [], info
    assert attached(net.exec, net.name("gw")) == {} and "clsact" not in qdiscs(net), info
    net.exec(net.name("gw"), [sys.executable, "-m", "natedit", "cleanup"])  # rules (SIGKILL,
    # SIGUSR2 leave them: fail closed) and anything else natedit left


def test_cleanup_removes_a_program_whose_guard_was_killed_too(net: Netns,
                                                              tmp_path: Path) -> None:
    worker, progs, map_ids = start(net, tmp_path)
    prog_id = min(progs.values())
    try:
        children = [int(c) for t in Path(f"/proc/{worker.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        guards = [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "sh"
                  and b"tc filter show" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(guards) == 1, children
        os.kill(guards[0], signal.SIGKILL)  # our worker's own guard, then the worker
        worker.kill()
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    time.sleep(0.5)
    left_after_kill = alive(net, prog_id, map_ids)
    still = attached(net.exec, net.name("gw"))
    done = net.exec(net.name("gw"), [sys.executable, "-m", "natedit", "cleanup"])
    left = gone_soon(net, prog_id, map_ids)
    info = f"{done.stdout}{done.stderr}"
    # the filter (and with it program and maps) outlived worker and guard ...
    assert still == progs and len(left_after_kill) == 3, (still, left_after_kill)
    # ... until natedit cleanup
    assert attached(net.exec, net.name("gw")) == {} and left == [], info
    assert "clsact" not in qdiscs(net), info
