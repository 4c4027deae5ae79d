"""The kernel fast path (``datapath: kernel``) with the real peers.

The scenarios of tests/netns/test_e2e_natedit.py run in both datapaths; these tests
check what only the kernel datapath promises: GRE of established calls never
reaches the queues (the kernel's queue figures), the element counters reach
the metrics and keep busy calls alive past ``call_idle`` while idle ones are
released and leave the kernel's maps, and a reload switches datapaths with
live calls.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from natedit.lab.topology import Lab
from natedit.metrics import parse_queue_stats
from tests.harness import require_netns, scenarios
from tests.harness.kernel import kernel_maps
from tests.harness.scenarios import Gateway

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
FORCED = 0x1234


@pytest.fixture(autouse=True)
def _real_peers() -> None:
    require_netns()


def start_worker(lab: Lab, policy: str) -> subprocess.Popen[bytes]:
    path, ready = lab.tmpdir / "policy.yaml", lab.tmpdir / "natedit.ready"
    path.write_text(policy)
    return lab.start_gateway_process(
        [sys.executable, "-m", "natedit", "run", "--policy", str(path), "--ready-file",
         str(ready), "--pid-file", str(lab.tmpdir / "natedit.pid"), "--state", ""],
        ready=ready.exists, cwd=str(REPO), name="natedit")


def gateway(policy: str) -> Gateway:
    def setup(lab: Lab) -> None:
        lab.gateway_masquerade_only()
        start_worker(lab, policy)

    return Gateway("natedit-fastpath", setup)


def fast_maps(lab: Lab) -> dict[str, dict[tuple[object, ...], int]]:
    """The elements of the tc-BPF program's maps in the gateway and their packets, in the
    words of the nftables design: in_daddr and in_cid (natedit_in), out_saddr
    (natedit_out); {}: no program attached."""
    return kernel_maps(lab.exec, lab.gw_ns)


def queued(lab: Lab) -> int:
    """Packets queued to natedit since its queues were bound (both queues)."""
    text = lab.exec(lab.gw_ns, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return sum(q.id_sequence for q in parse_queue_stats(text).values())


def metric(lab: Lab, sample: str) -> float:
    """The sum of the samples whose line starts with ``sample`` (name and labels)."""
    code = ("import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9723/metrics', timeout=5).read().decode())")
    text = lab.exec(lab.gw_ns, [sys.executable, "-c", code]).stdout
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(sample))


def released(lab: Lab) -> list[dict[str, str]]:
    out = []
    for line in lab.process_log(lab.gateway_processes[0]).splitlines():
        if "event=call_released " in line:
            out.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line)))
    return out


def test_gre_of_established_calls_never_reaches_the_queues() -> None:
    with scenarios.session(gateway("datapath: kernel\n"), 2) as s:
        lab = s.lab
        s.start_call(0, forced_call_id=FORCED)
        s.start_call(1, forced_call_id=FORCED)
        assert s.wait_connected([0, 1])
        assert s.phase("warm", [0, 1], 5)
        before = queued(lab)
        assert s.phase("burst", [0, 1], 200)
        during = queued(lab) - before
        maps = fast_maps(lab)
        time.sleep(2.5)  # one reading of the counters
        gre_out = metric(lab, 'natedit_gre_packets_total{direction="outbound"')
        gre_in = metric(lab, 'natedit_gre_packets_total{direction="inbound"')
        kernel_out = metric(lab, 'natedit_kernel_gre_packets_total{direction="outbound"')
        kernel_in = metric(lab, 'natedit_kernel_gre_packets_total{direction="inbound"')
        kernel_calls = metric(lab, "natedit_kernel_calls ")
        datapath = metric(lab, 'natedit_datapath{datapath="kernel"}')
        r = s.finish("fastpath", {})
    info = r.describe() + f"\nmaps {maps}\nqueued during the burst {during}"
    assert all(c.clean for c in r.calls.values()), info
    assert during == 0, info  # 800 GRE packets crossed, none through a queue
    assert len(maps["in_daddr"]) == len(maps["in_cid"]) == len(maps["out_saddr"]) == 2, info
    assert all(p >= 205 for p in maps["in_daddr"].values()), info
    assert all(p >= 205 for p in maps["out_saddr"].values()), info
    assert gre_out >= 410 and gre_in >= 410, info  # the kernel's packets are counted
    assert kernel_out >= 400 and kernel_in >= 400, info  # ... and shown apart (dashboard)
    assert (kernel_calls, datapath) == (2, 1), info


def test_kernel_counters_keep_busy_calls_and_idle_ones_leave() -> None:
    """call_idle 3 s: a call whose GRE flows only through the kernel for 8 s stays; once
    its GRE stops it is released as idle and its elements leave the kernel."""
    policy = "datapath: kernel\ntimeouts:\n  call_idle: 3\n"
    with scenarios.session(gateway(policy), 2) as s:
        lab = s.lab
        s.start_call(0, forced_call_id=FORCED)
        s.start_call(1, forced_call_id=FORCED)
        assert s.wait_connected([0, 1])
        busy = True
        for i in range(16):
            busy = s.phase(f"t{i}", [0], 2) and busy
            time.sleep(0.5)
        early = released(lab)
        still = fast_maps(lab)
        time.sleep(3.0 + 2.0 + 1.5)  # idle timeout, a counter reading, a turn
        late = released(lab)
        gone = fast_maps(lab)
        r = s.finish("fastpath_idle", {})
    info = r.describe() + f"\nbefore {still}\nafter {gone}"
    assert busy, info
    victim = r.call(1).client_addr  # sent nothing after its hello: idle from the start
    assert [e["client_address"] for e in early] == [victim], info
    assert early[0]["reason"] == "idle", info
    assert len(still["in_daddr"]) == 1, info
    assert {e["reason"] for e in late} == {"idle"} and len(late) == 2, info
    assert gone["in_daddr"] == {} and gone["out_saddr"] == {}, info


@pytest.mark.parametrize("start", ["userspace", "kernel"])
def test_a_reload_switches_the_datapath_with_live_calls(start: str) -> None:
    """userspace -> kernel -> userspace, and kernel -> userspace -> kernel: the live calls
    flow all along; in kernel their GRE is the program's (none queued), in userspace no
    program is left."""
    other = "kernel" if start == "userspace" else "userspace"
    with scenarios.session(gateway(f"datapath: {start}\n"), 2) as s:
        lab = s.lab
        s.start_call(0, forced_call_id=FORCED)
        s.start_call(1, forced_call_id=FORCED)
        assert s.wait_connected([0, 1])
        flows: list[bool] = []
        tables: list[tuple[str, dict[str, dict[tuple[object, ...], int]]]] = []
        through_queue: list[int] = []
        outcomes: list[tuple[int, str]] = []
        for datapath in (start, other, start):
            if len(flows):
                (lab.tmpdir / "policy.yaml").write_text(f"datapath: {datapath}\n")
                done = lab.exec(lab.gw_ns, [sys.executable, "-m", "natedit", "reload",
                                            "--ready-file", str(lab.tmpdir / "natedit.ready")],
                                check=False)
                outcomes.append((done.returncode, done.stderr))
            before = queued(lab)
            flows.append(s.phase(f"{datapath}{len(flows)}", [0, 1], 30))
            through_queue.append(queued(lab) - before)
            tables.append((datapath, fast_maps(lab)))
        ready = json.loads((lab.tmpdir / "natedit.ready").read_text())
        r = s.finish("fastpath_reload", {})
    info = r.describe() + f"\n{outcomes}\n{tables}\nqueued {through_queue}"
    assert [rc for rc, _ in outcomes] == [0, 0], info
    assert all(flows), info
    for (datapath, table), queued_packets in zip(tables, through_queue, strict=True):
        if datapath == "kernel":
            assert len(table["in_daddr"]) == 2 and queued_packets == 0, info
        else:
            assert table == {} and queued_packets >= 2 * 2 * 30, info
    assert all(c.clean for c in r.calls.values()), info
    assert ready["policy"]["reloads_ok"] == 2, info
