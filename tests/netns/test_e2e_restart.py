"""The worker killed (SIGKILL) or stopped for a restart (SIGUSR2) under traffic, and
started again on the same state file, in both datapaths (``kernel``: the tc-BPF
program goes with the worker and the new one attaches it with the restored calls
in its maps).

Real peers in the namespace lab (pptpd, pptp-linux clients forced onto one
Call ID): frames flow continuously, one per call every ``TICK`` seconds, while
the worker is killed and a new one starts with the same ``--state`` file.
What must hold: the new worker restores the live calls (its log says how many),
every frame sent after it is ready comes back to its sender, the server's GRE
carries the same public Call IDs before and after (tshark on the public
side), no call is mapped anew, nothing is delivered to the wrong call. What is
measured: how long the gap was and how many frames were lost in it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from natedit.lab.topology import SERVER_ADDR, Lab
from tests.harness import require_netns, scenarios
from tests.harness.scenarios import Gateway

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
FORCED = 0x1234
PUBLIC = "198.51.100.1"
TICK = 0.01
"""Seconds between two rounds of frames (one per call) while the worker is restarted."""
FIGURES = Path("/tmp/natedit-restart-figures")
"""The last run's figures, for the note (also in the assertion messages)."""


def start_worker(lab: Lab, name: str, state: Path, wait: bool = True,
                 datapath: str = "userspace") -> subprocess.Popen[bytes]:
    ready, policy = lab.tmpdir / f"{name}.ready", lab.tmpdir / "policy.yaml"
    policy.write_text(f"datapath: {datapath}\n")  # (userspace: the built-in policy's)
    return lab.start_gateway_process(
        [sys.executable, "-m", "natedit", "run", "--ready-file", str(ready),
         "--pid-file", str(lab.tmpdir / f"{name}.pid"), "--state", str(state),
         *(["--policy", str(policy)] if datapath == "kernel" else [])],
        ready=ready.exists if wait else None, cwd=str(REPO), name=name)


def log_events(lab: Lab, proc: subprocess.Popen[bytes], name: str) -> list[dict[str, str]]:
    out = []
    for line in lab.process_log(proc).splitlines():
        if f"event={name} " in line:
            out.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line)))
    return out


@pytest.mark.parametrize("datapath", ["userspace", "kernel"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR2], ids=["sigkill", "sigusr2"])
def test_stop_and_restart_keep_live_calls(sig: int, datapath: str, n_calls: int = 3) -> None:
    require_netns()
    state: dict[str, Path] = {}

    def setup(lab: Lab) -> None:
        lab.gateway_masquerade_only()
        state["path"] = lab.tmpdir / "state" / "natedit.db"
        start_worker(lab, "natedit-1", state["path"], datapath=datapath)

    with scenarios.session(Gateway("natedit-sigkill-restart", setup), n_calls) as s:
        lab, pump = s.lab, s.pump
        keys = list(range(n_calls))
        for i in keys:
            s.start_call(i, forced_call_id=FORCED)
        connected = s.wait_connected(keys)
        before = s.phase("before", keys, 20)
        first = lab.gateway_processes[0]
        mapped_first = log_events(lab, first, "call_mapped")

        # continuous traffic; the worker is killed after a while and started again
        sent_at: dict[tuple[int, int], float] = {}

        def tick() -> None:
            for key, seqs in pump.send_round(keys, 1, gap=TICK).items():
                for seq in seqs:
                    sent_at[(key, seq)] = time.monotonic()

        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            tick()
        t_kill = time.monotonic()
        rc = lab.stop_process(first, sig, 5.0)
        second = start_worker(lab, "natedit-2", state["path"], wait=False, datapath=datapath)
        ready_file = lab.tmpdir / "natedit-2.ready"
        deadline = time.monotonic() + 20.0
        while not ready_file.exists() and second.poll() is None and time.monotonic() < deadline:
            tick()
        t_ready = time.monotonic()
        t_end = t_ready + 1.5
        while time.monotonic() < t_end:
            tick()
        pump.wait_returned(keys, 3.0)
        after = s.phase("after_restart", keys, 20)
        new_call_key = n_calls
        s.start_call(0, forced_call_id=FORCED + 1, key=new_call_key)  # client 1's is live
        new_connected = s.wait_connected([new_call_key])
        new_call = s.phase("new_call", [new_call_key], 10)
        restored = log_events(lab, second, "state_restored")
        mapped_second = log_events(lab, second, "call_mapped")
        rc2 = lab.stop_process(second, signal.SIGTERM, 5.0)
        r = s.finish(f"{signal.Signals(sig).name.lower()}_restart", {})

    returned = {(k, q) for k in keys for q in pump.stats[k].returned}
    lost = [kq for kq in sent_at if kq not in returned]
    in_gap = [kq for kq in lost if t_kill - 0.05 <= sent_at[kq] <= t_ready + 0.05]
    sent_in_gap = [kq for kq, t in sent_at.items() if t_kill <= t <= t_ready]
    after_ready = [kq for kq, t in sent_at.items() if t > t_ready + 0.05]
    ids_from_server_after = sorted({g.call_id for g in r.wire.gre
                                    if g.src == SERVER_ADDR and g.dst == PUBLIC})
    publics = sorted(int(e["public_call_id"], 0) for e in mapped_first)
    figures = {
        "signal": signal.Signals(sig).name,
        "datapath": datapath,
        "calls": n_calls,
        "gap_seconds": round(t_ready - t_kill, 3),
        "tick_seconds": TICK,
        "frames_sent_total": len(sent_at),
        "frames_sent_in_gap": len(sent_in_gap),
        "frames_lost": len(lost),
        "frames_lost_in_gap": len(in_gap),
        "frames_lost_outside_gap": len(lost) - len(in_gap),
        "frames_sent_after_ready": len(after_ready),
        "public_call_ids_before": publics,
        "public_call_ids_from_the_server": ids_from_server_after,
        "restored": restored,
    }
    kernel = "-kernel" if datapath == "kernel" else ""
    (FIGURES.parent / f"{FIGURES.name}.{signal.Signals(sig).name}{kernel}.json").write_text(
        json.dumps(figures, indent=1) + "\n")
    info = f"{json.dumps(figures)}\n{r.describe()}"
    assert connected and before, info
    assert rc == (-sig if sig == signal.SIGKILL else 0), info
    assert restored and int(restored[0]["calls"]) == n_calls, info
    assert after and all(r.calls[k].phases["after_restart"].complete for k in keys), info
    assert all(kq in returned for kq in after_ready), info  # nothing lost once it is back
    assert figures["frames_lost_outside_gap"] == 0, info
    # the same public Call IDs: no new mapping for the live calls; the server's GRE, all
    # run long, carries the IDs they had and the new call's, nothing else
    assert len(set(publics)) == n_calls, info
    assert len(mapped_second) == 1, info  # only the new call
    new_public = int(mapped_second[0]["public_call_id"], 0)
    assert ids_from_server_after == sorted({*publics, new_public}), info
    assert new_connected and new_call and r.calls[new_call_key].clean, info
    assert rc2 == 0, info
    assert r.total_foreign == 0, info
