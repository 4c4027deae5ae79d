"""The call table in Redis and the follower: against real redis-servers this test starts.

Each test starts its own redis-server (natedit.lab.redis: a unix socket in the test's
temporary directory, or 127.0.0.1 on a free port for a replica) and stops it by PID.
Under CI=true a missing redis-server fails the test; elsewhere it is skipped.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from natedit import Action, CallRecord, Event, MessageType, redisstate, state
from natedit import pair as pair_mod
from natedit.core.translator import Translator
from natedit.lab import procs
from natedit.lab import redis as labredis
from natedit.pair import Follower, Role, Session, conflicts
from natedit.worker import Dispatcher
from tests.conftest import require
from tests.pptp_flows import (
    IN,
    OUT,
    Conversation,
    assert_table_consistent,
    establish,
    forward,
    make_translator,
    msg,
)

MT = MessageType


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[procs.Processes]:
    require(procs.which("redis-server") is not None,
            "redis-server is missing (Debian package redis-server)")
    p = procs.Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def server(lab: procs.Processes, tmp_path: Path) -> labredis.RedisServer:
    return labredis.start(lab, tmp_path / "master")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def busy(n: int = 3) -> Translator:
    tr = make_translator()
    for i in range(n):
        conv = Conversation(tr, f"10.0.0.{10 + i}", client_port=40000 + i)
        conv.open()
        establish(conv, 0x1234, 0x80 + i)
    return tr


def table(tr: Translator) -> list[CallRecord]:
    return sorted(tr.snapshot(), key=str)


def exec_calls(server: labredis.RedisServer) -> int:
    stats: Any = server.client().info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


# -- the backend ---------------------------------------------------------------------------


def test_calls_written_to_redis_come_back_in_a_new_worker(server: labredis.RedisServer) -> None:
    old = busy()
    counts: Counter[str] = Counter()
    j = redisstate.restore_into(old, server.url, counts)  # Redis empty: writes the table
    assert server.client().hlen(redisstate.CALLS) == 3
    j.close()
    new = make_translator()
    j2 = redisstate.restore_into(new, server.url, counts)
    assert table(new) == table(old)
    assert_table_consistent(new.table)
    assert not counts
    j2.close()


def test_the_worker_writes_one_pipeline_per_turn(server: labredis.RedisServer) -> None:
    tr = make_translator()
    counts: Counter[str] = Counter()
    with state.journal(tr, server.url, counts) as j:
        assert j is not None
        d = Dispatcher(tr)
        d.journal = j
        convs = [Conversation(tr, f"10.0.0.{10 + i}", client_port=40000 + i) for i in range(3)]
        before = exec_calls(server)
        for conv in convs:  # one turn of the loop: three calls set up
            conv.open()
            establish_logged(d, conv, 0x1234)
        d.flush()
        assert exec_calls(server) == before + 1
        c: Any = server.client()
        assert c.hlen(redisstate.CALLS) == 3
        feed = c.xrange(redisstate.FEED)
        seqs = [int(f["seq"]) for _, f in feed]
        assert seqs == list(range(1, len(seqs) + 1))  # no gaps
        assert int(c.get(redisstate.SEQ)) == seqs[-1]
        # a call cleared: its row goes, the feed says del
        forward(convs[0], OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
        forward(convs[0], IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x80))
        d.log_events(drain(convs[0]))
        d.flush()
        assert exec_calls(server) == before + 2
        assert c.hlen(redisstate.CALLS) == 2
        assert c.xrevrange(redisstate.FEED, count=1)[0][1]["op"] == "del"
    assert not counts


def establish_logged(d: Dispatcher, conv: Conversation, client_call_id: int) -> int:
    public = establish(conv, client_call_id, 0x80 + conv.client_port % 100)
    d.log_events(drain(conv))
    return public


def drain(conv: Conversation) -> list[Event]:
    """The events of the conversation's verdicts since the last drain."""
    events = [e for v in conv.verdicts for e in v.events]
    conv.verdicts.clear()
    return events


def test_redis_unreachable_is_counted_and_the_table_rewritten_when_back(
        lab: procs.Processes, tmp_path: Path) -> None:
    port = free_port()
    first = labredis.start(lab, tmp_path / "a", port=port)
    tr = busy(2)
    counts: Counter[str] = Counter()
    j = redisstate.restore_into(tr, first.tcp_url, counts)
    lab.stop(first.proc)  # gone, and its data with it
    conv = Conversation(tr, "10.0.0.99", client_port=41000)
    conv.open()
    establish(conv, 0x1234, 0x99)
    j.note(drain(conv))
    j.commit()  # never raises: counted, kept for later
    assert counts["state_error"] == 1
    assert j.pending
    j.commit()  # within RETRY_AFTER: not even tried (no timeout in the loop), counted
    assert counts["state_error"] == 2
    back = labredis.start(lab, tmp_path / "b", port=port)
    time.sleep(redisstate.RETRY_AFTER)
    j.commit()
    assert not j.pending
    c: Any = back.client()
    assert c.hlen(redisstate.CALLS) == 3  # the whole table, not only the last change
    (last,) = c.xrevrange(redisstate.FEED, count=1)
    assert last[1]["op"] == "reset"
    j.close()


def test_a_worker_without_redis_starts_and_keeps_translating(tmp_path: Path) -> None:
    tr = make_translator()
    counts: Counter[str] = Counter()
    url = f"unix://{tmp_path}/nothing.sock?db=0"
    with state.journal(tr, url, counts) as j:
        assert j is not None
        conv = Conversation(tr, "10.0.0.5")
        conv.open()
        establish(conv, 0x1234, 0x80)  # the core goes on
        j.note(drain(conv))
        j.commit()
    assert counts["state_error"] >= 2  # the start, the write (the close's commit)
    assert len(tr.snapshot()) == 1


# -- the follower --------------------------------------------------------------------------------


def test_a_follower_on_a_replica_keeps_a_warm_copy(lab: procs.Processes, tmp_path: Path) -> None:
    port = free_port()
    master = labredis.start(lab, tmp_path / "m", port=port, bind="127.0.0.1")
    replica = labredis.start(lab, tmp_path / "r", replicaof=("127.0.0.1", port))
    tr = busy(2)
    counts: Counter[str] = Counter()
    j = redisstate.restore_into(tr, master.url, counts)
    f = Follower(replica.url).start()
    try:
        wait_for(lambda: len(f.table()) == 2)
        assert f.loads >= 1
        for i in range(3):  # new calls arrive through the feed, not by loading again
            conv = Conversation(tr, f"10.0.1.{i}", client_port=42000 + i)
            conv.open()
            establish(conv, 0x1234, 0x90 + i)
            j.note(drain(conv))
            j.commit()
        wait_for(lambda: len(f.table()) == 5)
        loads = f.loads
        assert f.applied >= 3 and f.behind == 0
        wait_for(lambda: f.link_up is True)
        assert f.following
        assert sorted(f.table(), key=str) == table(tr)
        # a reset (a new active's first write) loads again
        j.store.replace_all(tr.snapshot()[:1], time.time())
        wait_for(lambda: len(f.table()) == 1)
        assert f.loads == loads + 1
        # the master dies: the replica's link goes down, the follower says so
        lab.stop(master.proc)
        wait_for(lambda: f.link_up is False)
        assert not f.following
        s = Session(replica.url, role=Role.FOLLOWING, follower=f)
        assert s.current_role is Role.STANDBY
        # promoted: REPLICAOF NO ONE; the last read takes the table as it is
        replica.cli("REPLICAOF", "NO", "ONE")
        f.stop()
        f.catch_up()
        assert len(f.table()) == 1
    finally:
        f.close()
        j.store.close()


def test_a_follower_whose_redis_is_unreachable_reports_it(tmp_path: Path) -> None:
    f = Follower(f"unix://{tmp_path}/nothing.sock?db=0").start()
    try:
        wait_for(lambda: f.errors >= 1)
        assert not f.following
        s = Session("x", role=Role.FOLLOWING, follower=f)
        assert s.current_role is Role.STANDBY
        families = {m.name: m for m in s.collect()}
        assert [x.value for x in families["natedit_pair_following"].samples] == [0.0]
        role = {x.labels["role"]: x.value for x in families["natedit_pair_role"].samples}
        assert role == {"active": 0.0, "following": 0.0, "standby": 1.0}
    finally:
        f.close()


def test_a_gap_in_the_feed_loads_again(server: labredis.RedisServer) -> None:
    tr = busy(2)
    j = redisstate.restore_into(tr, server.url, Counter())
    f = Follower(server.url)
    f.step(None)
    assert len(f.table()) == 2
    c: Any = server.client()
    c.xadd(redisstate.FEED, {"seq": f.seq + 5, "op": "del", "key": "x"})  # seq jumps
    c.hdel(redisstate.CALLS, next(iter(c.hkeys(redisstate.CALLS))))
    loads = f.loads
    f.step(None)
    assert f.loads == loads + 1 and len(f.table()) == 1
    f.close()
    j.store.close()


# -- split brain -----------------------------------------------------------------------------------


def test_each_node_allocates_from_its_own_share() -> None:
    for node in (1, 2):
        tr = make_translator(call_id_node=node, call_id_nodes=2)
        ids = set()
        for i in range(40):
            conv = Conversation(tr, f"10.0.{i}.1", client_port=40000 + i)
            conv.open()
            ids.add(establish(conv, 0x1234, 0x80 + i))
        assert all(cid % 2 == node - 1 for cid in ids), (node, sorted(ids))
    tr = make_translator(call_id_node=2, call_id_nodes=2, call_id_first=10, call_id_last=13)
    verdicts = []
    for i in range(3):  # 11 and 13 only: the third is refused, pool exhausted
        conv = Conversation(tr, f"10.0.{i}.1", client_port=40000 + i)
        conv.open()
        verdicts.append(conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)))
    assert [v.action for v in verdicts] == [Action.ACCEPT, Action.ACCEPT, Action.DROP]
    assert verdicts[2].reason == "refused:pool_exhausted"
    assert {c.public_call_id for c in tr.calls()} == {11, 13}


def test_a_promotion_is_refused_over_conflicting_calls() -> None:
    a, b = busy(2), busy(2)  # the same clients, the same generator: the same public IDs
    assert conflicts(a.snapshot(), b.snapshot()) == []  # the same calls: no conflict
    other = make_translator()
    conv = Conversation(other, "10.0.0.77", client_port=40000)
    conv.open()
    establish(conv, 0x1234, 0x80)
    (mine,) = other.snapshot()
    clash = [r for r in a.snapshot() if r.public_call_id == mine.public_call_id]
    assert clash, "the same generator gives the same first public Call ID"
    problems = conflicts(a.snapshot(), [mine])
    assert len(problems) == 1 and "10.0.0.77" in problems[0]


def test_signal_names() -> None:
    assert pair_mod.signal_name(pair_mod.PROMOTE_SIGNAL) == pair_mod.PROMOTE
    assert pair_mod.signal_name(pair_mod.DEMOTE_SIGNAL) == pair_mod.DEMOTE
    assert pair_mod.signal_name(15) == "SIGTERM"
