"""Two gateways, no call lost: an active/standby pair, A killed under traffic.

Real peers (:mod:`natedit.lab.pairlab`): three pptp-linux clients on the inside
bridge, all forced onto one Call ID, pptpd on the outside bridge, gateways A
and B each running keepalived (VRRP for both virtual addresses, one sync
group, the shipped notify script), conntrackd (FTFW over the sync link),
redis-server (B's a replica of A's) and natedit (B following). Frames flow
through A; A is killed (every process SIGKILL, links down); B becomes master,
its notify script promotes its Redis and natedit. What must hold: every call
keeps flowing with the same public Call IDs (the server's GRE), the control
connections survive (an Echo-Request and a Call-Clear-Request after the
failover, answered by the server), frames are lost only in the gap. Then B is
demoted and promoted by hand; A comes back as backup, follows B, and B is killed:
the calls go on through A. Then A's Redis is killed: A keeps translating
(state_error counted). A second test kills B while it is standby: nothing changes.
What is measured: the gap (kill -> VRRP master on B, -> natedit active, -> first
frame back), in FIGURES.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from natedit.lab import pairlab
from natedit.lab.pairlab import PairGateway, metric
from natedit.lab.peers import start_pptp_client
from natedit.lab.topology import SERVER_ADDR, Lab
from tests.conftest import require
from tests.harness import require_netns, scenarios
from tests.harness.capture import CCRQ
from tests.unit.test_deploy import PAIR_PANELS, panel_queries

pytestmark = pytest.mark.netns

FORCED = 0x1234
TICK = 0.02
"""Seconds between two rounds of frames (one per call)."""
ADVERT_INT = float(os.environ.get("NATEDIT_PAIR_ADVERT_INT", "1"))
"""VRRP's advert_int (sub-second: VRRPv3); the master is declared down after about 3 x."""
IDLE_WAIT = 10
"""pptp-linux's --idle-wait: an Echo-Request every this many idle seconds; one still
unanswered at the next makes it close the connection, so it must exceed the gap plus
TCP's retransmission backoff (the Echo-Request lost in the gap comes again ~6 s later)."""
FIGURES = Path(f"/tmp/natedit-pair-figures-{ADVERT_INT:g}-{os.getpid()}.json")
ECHO_REQUEST = 5


def require_pair() -> None:
    require_netns()
    problems = pairlab.missing()
    require(not problems, "gateway pair lab unavailable: " + "; ".join(problems))


def wait(what: object, timeout: float, step: float = 0.05) -> bool:
    assert callable(what)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return bool(what())


def events(text: str, name: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line)) for line in text.splitlines()
            if f"event={name}" in line]


def pair_setup(gws: dict[str, PairGateway]) -> scenarios.Gateway:
    """A master, then B following it (and a capture of B's TCP 1723)."""

    def setup(lab: Lab) -> None:
        pairlab.make_switch(lab)
        for node, first in (("ga", True), ("gb", False)):
            gws[node] = PairGateway(lab, pairlab.SIDES[node], lab.tmpdir / node, ADVERT_INT,
                                    master_first=first)
        gws["ga"].start()
        assert wait(lambda: gws["ga"].role == "active", 15), (
            gws["ga"].notify_log() + gws["ga"].log("natedit")[-3000:]
            + gws["ga"].log("keepalived")[-3000:])
        gws["gb"].start()
        pcap = lab.tmpdir / "gb.pcap"
        lab.popen(lab.node("gb"), ["tcpdump", "-i", "any", "-U", "-n", "-w", str(pcap),
                                   "tcp port 1723"], name="tcpdump-gb")

    return scenarios.Gateway("natedit-pair", setup)


def start_calls(s: scenarios.Session, keys: list[int]) -> bool:
    """One call per client, all forced onto one Call ID; whether all connected."""
    b = s.lab
    assert wait(lambda: "BACKUP" in (b.tmpdir / "gb" / "notify.log").read_text()
                if (b.tmpdir / "gb" / "notify.log").exists() else False, 10)
    for i in keys:
        call = start_pptp_client(s.lab, i, forced_call_id=FORCED,
                                 extra_args=["--idle-wait", str(IDLE_WAIT),
                                             "--max-echo-wait", "30"])
        s.calls[call.key] = call
        s.pump.add(call.key, call.sock)
    return s.wait_connected(keys)


def pair_row_metrics() -> set[str]:
    """The metric names the dashboard's pair row queries."""
    return {name for title, expr in panel_queries() if title in PAIR_PANELS
            for name in re.findall(r"\b(natedit_\w+)\b", expr)}


def test_failover_keeps_every_call(n_calls: int = 3) -> None:
    require_pair()
    gws: dict[str, PairGateway] = {}
    with scenarios.session(pair_setup(gws), n_calls, extra=pairlab.PAIR) as s:
        t0 = time.monotonic()
        lab, pump = s.lab, s.pump
        a, b = gws["ga"], gws["gb"]
        keys = list(range(n_calls))
        connected = start_calls(s, keys)
        before = s.phase("before", keys, 20)
        mapped_a = events(a.log("natedit"), "call_mapped")
        def b_follows() -> bool:
            m = b.metrics()
            return (metric(m, "natedit_pair_calls_followed") == n_calls
                    and metric(m, "natedit_pair_role", 'role="following"') == 1)

        t_follow = time.monotonic()
        followed = wait(b_follows, 10)
        t_follow = time.monotonic() - t_follow
        b_metrics_before = b.metrics()
        diag = {"b_replication": str(b.redis.client().info("replication")) if b.redis else "",
                "b_metrics_before": "\n".join(
                    line for line in b_metrics_before.splitlines() if "pair" in line),
                "b_external_cache_before": b.exec(*b.conntrackd_cmd().split(), "-e", check=False),
                "a_conntrack_before": a.exec("conntrack", "-L", check=False)}

        # continuous traffic; A is killed
        sent_at: dict[tuple[int, int], float] = {}

        def tick() -> None:
            for key, seqs in pump.send_round(keys, 1, gap=TICK).items():
                for seq in seqs:
                    sent_at[(key, seq)] = time.monotonic()

        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            tick()
        def echoes_seen() -> int:  # Echo-Requests pptpd answered
            return sum("Control Message (type: 5)" in line for line in lab.syslog.lines())

        echoes_at_kill = echoes_seen()
        t_kill = a.kill()
        t_master = t_active = None
        deadline = t_kill + 2 * IDLE_WAIT + 5
        while time.monotonic() < deadline:
            tick()
            if t_master is None and "MASTER" in b.notify_log():
                t_master = time.monotonic()
            if t_active is None and b.role == "active":
                t_active = time.monotonic()
            if t_active is not None and echoes_seen() >= echoes_at_kill + n_calls:
                break
        pump.wait_returned(keys, 3.0)
        after = s.phase("after_failover", keys, 20)
        # a Call-Clear-Request through B: the first client hangs up
        s.calls[0].close_ppp()
        cleared = wait(lambda: events(b.log("natedit"), "call_released"), 5)
        b_log = b.log("natedit")
        b_metrics_after = b.metrics()
        diag["b_tcp"] = "\n".join(
            line for line in lab.exec(lab.node("gb"), ["tcpdump", "-n", "-r",
                                      str(lab.tmpdir / "gb.pcap")], check=False).stdout
            .splitlines() if "[R" in line or "[F" in line)
        diag.update(b_notify=b.notify_log(), b_conntrack=b.exec("conntrack", "-L", check=False),
                    b_conntrackd=(b.dir / "conntrackd.log").read_text(errors="replace")[-3000:],
                    b_keepalived=b.log("keepalived")[-3000:])

        # natedit demote and promote on B by hand: following its own Redis, then active
        # again with the same table
        def natedit(*argv: str) -> int:
            return lab.exec(b.ns, [sys.executable, "-m", "natedit", *argv, "--ready-file",
                                   str(b.ready_file), "--wait", "10"], check=False).returncode

        demote_rc = natedit("demote")
        role_demoted = b.role
        promote_rc = natedit("promote")
        repromoted = s.phase("after_repromote", keys[1:], 10)

        # A comes back as backup (a fresh start: Redis a replica of B's, natedit following),
        # follows B, then B is killed: the second failover, back to A
        live = keys[1:]
        a2 = PairGateway(lab, pairlab.SIDES["ga"], lab.tmpdir / "ga2", ADVERT_INT,
                         master_first=False)
        a.links_up()
        a2.start()

        def a2_follows() -> bool:
            m = a2.metrics()
            return (metric(m, "natedit_pair_calls_followed") == len(live)
                    and metric(m, "natedit_pair_role", 'role="following"') == 1)

        a2_followed = wait(a2_follows, 15)
        back_before = s.phase("a_back", live, 10)
        sent2: dict[tuple[int, int], float] = {}
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            for key, seqs in pump.send_round(live, 1, gap=TICK).items():
                sent2.update({(key, q): time.monotonic() for q in seqs})
        t_kill2 = b.kill()
        t_active2 = None
        while time.monotonic() < t_kill2 + 15:
            for key, seqs in pump.send_round(live, 1, gap=TICK).items():
                sent2.update({(key, q): time.monotonic() for q in seqs})
            if t_active2 is None and a2.role == "active":
                t_active2 = time.monotonic()
            if t_active2 is not None and time.monotonic() > t_active2 + 1.0:
                break
        pump.wait_returned(live, 3.0)
        second = s.phase("after_second_failover", live, 10)
        lost2 = sorted(t for kq, t in sent2.items() if kq[1] not in pump.stats[kq[0]].returned)
        b = a2  # the active gateway from here on

        # the active alone: its Redis gone, it keeps translating and counts it
        assert b.redis is not None
        lab.stop_process(b.redis.proc, signal.SIGKILL)
        redis_down = s.phase("redis_down", keys[1:], 10)
        s.calls[1].close_ppp()  # a call event: its write fails, is counted, B goes on

        def state_errors() -> float:
            found = metric(b.metrics(), "natedit_worker_errors_total", 'kind="state_error"')
            return found or 0.0

        wait(lambda: state_errors() >= 1, 5)
        redis_down_after = s.phase("redis_down_after", keys[2:], 10)
        b_metrics_redis_down = b.metrics()
        r = s.finish("pair_failover", {})

    returned = {(k, q) for k in keys for q in pump.stats[k].returned}
    lost = sorted((t, kq) for kq, t in sent_at.items() if kq not in returned)
    t_first_back = min((t for kq, t in sent_at.items() if t > t_kill and kq in returned
                        and all(t2 < t for t2, _ in lost)), default=None)
    last_lost = lost[-1][0] if lost else None
    kill_rel = t_kill - t0
    from_server = sorted({g.call_id for g in r.wire.gre if g.src == SERVER_ADDR})
    from_server_after = sorted({g.call_id for g in r.wire.gre
                                if g.src == SERVER_ADDR and g.time > kill_rel + 5})
    echoes_after = [m for m in r.wire.pptp if m.msg_type in (ECHO_REQUEST, ECHO_REQUEST + 1)
                    and m.time > kill_rel + 5]
    ccrq = [m for m in r.wire.messages(CCRQ) if m.time > kill_rel]
    publics = sorted(int(e["public_call_id"], 0) for e in mapped_a)
    figures = {
        "calls": n_calls,
        "advert_int": ADVERT_INT,
        "vrrp_master_seconds": None if t_master is None else round(t_master - t_kill, 3),
        "natedit_active_seconds": None if t_active is None else round(t_active - t_kill, 3),
        "traffic_gap_seconds": None if last_lost is None else round(last_lost - t_kill, 3),
        "first_frame_back_seconds": None if t_first_back is None else round(
            t_first_back - t_kill, 3),
        "frames_sent": len(sent_at),
        "frames_lost": len(lost),
        "frames_lost_before_kill": sum(1 for t, _ in lost if t < t_kill - 0.1),
        "public_call_ids": publics,
        "from_server_after_failover": from_server_after,
        "echo_messages_after_failover": len(echoes_after),
        "call_clear_after_failover": len(ccrq),
        "promote": events(b_log, "promoted"),
        "b_following_after_calls_seconds": round(t_follow, 3),
        "second_failover_active_seconds": None if t_active2 is None else round(
            t_active2 - t_kill2, 3),
        "second_failover_gap_seconds": round(lost2[-1] - t_kill2, 3) if lost2 else None,
        "second_failover_frames_lost": len(lost2),
    }
    FIGURES.write_text(json.dumps(figures, indent=1) + "\n")
    info = (f"{json.dumps(figures)}\n" + "".join(f"{k}:\n{v}\n" for k, v in diag.items())
            + f"B natedit:\n{b_log[-4000:]}\n{r.describe()}")
    assert connected and before and followed, info
    assert len(set(publics)) == n_calls and all(p % 2 == 0 for p in publics), info  # A's share
    assert t_active is not None, info
    assert after and all(r.calls[k].phases["after_failover"].complete for k in keys), info
    assert figures["frames_lost_before_kill"] == 0, info
    assert all(t <= t_active + 0.5 for t, _ in lost), info  # lost only in the gap
    # every call keeps its public Call ID: the server's GRE carries those and no other
    assert from_server == publics and from_server_after == publics, info
    assert echoes_after, info  # control connections alive through B: Echo-Request/Reply
    # the Call-Clear-Request went out through B with the public Call ID, B released the call
    assert ccrq and {m.call_id for m in ccrq} <= set(publics) and cleared, info
    assert metric(b_metrics_before, "natedit_pair_role", 'role="following"') == 1, info
    assert metric(b_metrics_after, "natedit_pair_role", 'role="active"') == 1, info
    # every query of the dashboard's pair row has samples from the following worker
    # (tests/netns/test_e2e_metrics.py runs one worker: it checks every other row)
    exported = {ln.split("{")[0].split(" ")[0] for ln in b_metrics_before.splitlines()
                if ln and not ln.startswith("#")}
    assert pair_row_metrics() <= exported, (pair_row_metrics() - exported, info)
    assert (demote_rc, role_demoted, promote_rc) == (0, "following", 0), info
    assert repromoted, info  # the calls flow again through B, re-promoted
    # A came back as backup, followed B, took the calls over when B was killed
    assert a2_followed and back_before and t_active2 is not None and second, info
    assert all(t <= t_active2 + 0.5 for t in lost2), info
    assert redis_down and redis_down_after, info  # B translates on without its Redis ...
    errors = metric(b_metrics_redis_down, "natedit_worker_errors_total", 'kind="state_error"')
    assert errors is not None and errors >= 1, info  # ... and counts it
    assert r.total_foreign == 0, info


def test_standby_killed_changes_nothing(n_calls: int = 2) -> None:
    require_pair()
    gws: dict[str, PairGateway] = {}
    with scenarios.session(pair_setup(gws), n_calls, extra=pairlab.PAIR) as s:
        a, b = gws["ga"], gws["gb"]
        keys = list(range(n_calls))
        connected = start_calls(s, keys)
        before = s.phase("before", keys, 10)
        notify_before = a.notify_log()
        sent: dict[int, list[int]] = {k: [] for k in keys}
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            for k, seqs in s.pump.send_round(keys, 1, gap=TICK).items():
                sent[k] += seqs
        b.kill()
        t_end = time.monotonic() + 4 * ADVERT_INT + 1.0  # past B's VRRP timeout
        while time.monotonic() < t_end:
            for k, seqs in s.pump.send_round(keys, 1, gap=TICK).items():
                sent[k] += seqs
        s.pump.wait_returned(keys, 3.0)
        after = s.phase("after", keys, 10)
        a_metrics = a.metrics()
        role, notify_after = a.role, a.notify_log()
        r = s.finish("pair_standby_killed", {})
    lost = {k: sorted(set(sent[k]) - s.pump.stats[k].returned) for k in keys}
    info = f"lost={lost}\nA notify:\n{notify_after}\n{r.describe()}"
    assert connected and before and after, info
    assert all(not v for v in lost.values()), info  # not one frame lost
    assert role == "active" and notify_after == notify_before, info  # A did not even notice
    assert metric(a_metrics, "natedit_pair_role", 'role="active"') == 1, info
    assert metric(a_metrics, "natedit_worker_errors_total", 'kind="state_error"') in (None, 0), info
    assert all(r.calls[k].clean for k in keys), info
