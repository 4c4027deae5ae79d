"""The call table and its allocator: uniqueness, reuse, the high-byte rule, limits.

A Hypothesis state machine drives :class:`CallTable` directly (connections,
calls, releases, over tiny, boundary-crossing and full pools, random and
sequential) and checks the indexes after every step; the limits are then
checked end to end through the translator, with their verdicts and events.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from natedit import (
    ACCEPT,
    Action,
    Allocation,
    CallMapped,
    CallRecord,
    CallRefused,
    CallReleased,
    Direction,
    MessageType,
    Policy,
    Verdict,
)
from natedit.core.calls import Outcome
from natedit.core.errors import Refusal, ReleaseReason
from natedit.core.table import Call, CallState, CallTable, ConnKey, ControlConnection
from natedit.core.wire import build_ipv4
from tests.pptp_flows import (
    IN,
    OUT,
    PUBLIC,
    SERVER,
    Conversation,
    assert_table_consistent,
    establish,
    forward,
    high_bytes_one_to_one,
    make_translator,
    msg,
    payload_of,
    u16,
)

MT = MessageType
PUB = ipaddress.IPv4Address(PUBLIC).packed
SERVERS = [ipaddress.IPv4Address(SERVER).packed, bytes([203, 0, 113, 9])]
CLIENTS = [bytes([10, 0, 0, n]) for n in (5, 6, 7)]


def table(**kw: object) -> CallTable:
    policy = Policy(public_address=ipaddress.IPv4Address(PUBLIC), **kw)  # type: ignore[arg-type]
    return CallTable(policy, random.Random(7))


def conn_of(t: CallTable, client: bytes = CLIENTS[0], port: int = 40000,
            server: bytes = SERVERS[0]) -> ControlConnection:
    conn = t.connection((client, port, server, 1723), 0.0, create=True)
    assert conn is not None
    return conn


def new_call(t: CallTable, conn: ControlConnection, client_call_id: int) -> Call | None:
    call = t.allocate(conn, client_call_id >> 8, PUB, 0.0)
    if call is not None:
        conn.set_ids(call, client_call_id=client_call_id)
    return call


def why(t: CallTable, client: bytes, n: int = 1) -> str | None:
    """Why ``n`` new calls (client high byte 0) of a fresh connection would be refused."""
    return t.refusal(conn_of(t, client, 49999, SERVERS[0]), PUB, [0] * n)


def satisfies_high_byte_rule(conn: ControlConnection, client_hi: int, cid: int) -> bool:
    for c in conn.calls:
        if (c.client_call_hi == client_hi) != (c.public_call_id >> 8 == cid >> 8):
            return False
    return True


def free_ids(t: CallTable, conn: ControlConnection) -> int:
    """Free public Call IDs of the range and node share in ``conn``'s pool."""
    p = t.policy
    used = t.used.get((PUB, conn.server_ip), set())
    return p.share_size(p.call_id_first, p.call_id_last) - sum(
        p.call_id_first <= cid <= p.call_id_last and p.owns_call_id(cid) for cid in used)


def rule_keeping_id_exists(t: CallTable, conn: ControlConnection, client_hi: int) -> bool:
    """Whether a free public Call ID keeps the high-byte rule for a new call of ``conn``
    with client high byte ``client_hi`` (``conn`` keeps the rule so far)."""
    p = t.policy
    used = t.used.get((PUB, conn.server_ip), set())
    first, last = p.call_id_first, p.call_id_last
    want = conn.public_hi_for_client_hi(client_hi)
    if want is not None:
        return any(cid not in used and p.owns_call_id(cid)
                   for cid in range(max(first, want << 8), min(last, want << 8 | 0xFF) + 1))
    avoid = {c.public_call_id >> 8 for c in conn.calls}
    avoided = sum(p.owns_call_id(cid) for hi in avoid
                  for cid in range(max(first, hi << 8), min(last, hi << 8 | 0xFF) + 1))
    taken = sum(first <= cid <= last and p.owns_call_id(cid) and cid >> 8 not in avoid
                for cid in used)
    return p.share_size(first, last) - avoided - taken > 0


# -- the state machine ---------------------------------------------------------------------

POOLS = [(1, 3), (0, 0), (250, 262), (0x00F0, 0x0310), (1, 65535), (65000, 65535)]


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = table()
        self.keys: list[ConnKey] = []
        self.relaxed_conns: set[ControlConnection] = set()
        """Connections a call was mapped on with the high-byte rule relaxed."""

    @initialize(pool=st.sampled_from(POOLS),
                allocation=st.sampled_from(list(Allocation)),
                per_client=st.integers(1, 40), total=st.integers(1, 80),
                seed=st.integers(0, 2**32))
    def setup(self, pool: tuple[int, int], allocation: Allocation, per_client: int,
              total: int, seed: int) -> None:
        self.t = CallTable(Policy(
            public_address=ipaddress.IPv4Address(PUBLIC), call_id_first=pool[0],
            call_id_last=pool[1], allocation=allocation, max_calls_per_client=per_client,
            max_calls=total), random.Random(seed))

    @rule(client=st.sampled_from(CLIENTS), port=st.integers(40000, 40003),
          server=st.sampled_from(SERVERS))
    def open_connection(self, client: bytes, port: int, server: bytes) -> None:
        key = (client, port, server, 1723)
        assert self.t.connection(key, 0.0, create=True) is not None
        if key not in self.keys:
            self.keys.append(key)

    @rule(which=st.integers(0, 100), client_call_id=st.one_of(
        st.integers(0, 0xFFFF), st.sampled_from([0x1234, 0x1235, 0x12FF, 0x5678, 0, 1])))
    def map_call(self, which: int, client_call_id: int) -> None:
        if not self.keys:
            return
        conn = self.t.connections[self.keys[which % len(self.keys)]]
        hi = client_call_id >> 8
        why = self.t.refusal(conn, PUB, [hi])
        # pool_exhausted exactly when the pool has no free ID (the rule never refuses)
        assert (why is Refusal.POOL_EXHAUSTED) == (
            free_ids(self.t, conn) == 0 and why not in (Refusal.CLIENT_LIMIT, Refusal.TABLE_FULL))
        if why is not None:
            return
        keeps = conn not in self.relaxed_conns and rule_keeping_id_exists(self.t, conn, hi)
        relaxed = self.t.relaxed
        old = conn.call_by_client_id(client_call_id)
        call = self.t.allocate(conn, hi, PUB, 0.0)
        p = self.t.policy
        assert call is not None, "refusal() passed but allocate() found no ID"
        if keeps:  # an ID keeps the rule: the call gets one, nothing is relaxed
            assert satisfies_high_byte_rule(conn, hi, call.public_call_id)
            assert self.t.relaxed == relaxed
        elif conn not in self.relaxed_conns:  # none does: relaxed, and counted
            assert self.t.relaxed == relaxed + 1
            event("high-byte rule relaxed (one call)")
        if self.t.relaxed > relaxed:
            self.relaxed_conns.add(conn)
        assert p.call_id_first <= call.public_call_id <= p.call_id_last
        assert call.state is CallState.REQUESTED
        if old is not None:  # the translator releases a reused client Call ID
            self.t.release(old, ReleaseReason.DISCONNECT)
        conn.set_ids(call, client_call_id=client_call_id)

    @rule(which=st.integers(0, 100), his=st.lists(st.integers(0, 0xFF), min_size=2,
                                                   max_size=4))
    def map_calls_of_one_segment(self, which: int, his: list[int]) -> None:
        """As the translator does for a segment with several new calls: one refusal()
        for all, then an allocate() each, which must not fail (no private ID goes out)."""
        if not self.keys:
            return
        conn = self.t.connections[self.keys[which % len(self.keys)]]
        if self.t.refusal(conn, PUB, his) is not None:
            return
        relaxed = self.t.relaxed
        for hi in his:
            call = self.t.allocate(conn, hi, PUB, 0.0)
            assert call is not None
            conn.set_ids(call, client_call_id=hi << 8 | (len(conn.calls) & 0xFF))
        if self.t.relaxed > relaxed:
            event("high-byte rule relaxed")
            self.relaxed_conns.add(conn)

    @rule(which=st.integers(0, 10**6), server_call_id=st.integers(0, 0xFFFF))
    def answer(self, which: int, server_call_id: int) -> None:
        calls = list(self.t.calls())
        if not calls:
            return
        self.t.set_server_call_id(calls[which % len(calls)], server_call_id)

    @rule(which=st.integers(0, 10**6))
    def release_call(self, which: int) -> None:
        calls = list(self.t.calls())
        if not calls:
            return
        call = calls[which % len(calls)]
        self.t.release(call, ReleaseReason.DISCONNECT)
        self.t.release(call, ReleaseReason.DISCONNECT)  # twice is harmless
        assert call.released

    @rule(which=st.integers(0, 100))
    def close_connection(self, which: int) -> None:
        if not self.keys:
            return
        key = self.keys.pop(which % len(self.keys))
        conn = self.t.connections[key]
        for call in list(conn.calls):
            self.t.release(call, ReleaseReason.DISCONNECT)
        self.t.forget_connection(conn)
        assert key not in self.t.connections

    @invariant()
    def indexes_agree(self) -> None:
        # the rule holds in every connection where no call was mapped with it relaxed
        assert_table_consistent(self.t, one_to_one=False)
        for conn in self.t.connections.values():
            if conn not in self.relaxed_conns:
                assert high_bytes_one_to_one(conn)

    @invariant()
    def limits_hold(self) -> None:
        p = self.t.policy
        assert len(self.t) <= p.max_calls
        assert all(n <= p.max_calls_per_client for n in self.t.per_client.values())
        for call in self.t.calls():
            assert p.call_id_first <= call.public_call_id <= p.call_id_last


TableMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40,
                                          deadline=None)
test_table_machine = TableMachine.TestCase


# -- the allocator, example by example -----------------------------------------------------


def test_sequential_hands_out_in_order_across_connections() -> None:
    t = table(allocation=Allocation.SEQUENTIAL, call_id_first=100, call_id_last=104)
    ids = []
    for port in range(5):
        call = new_call(t, conn_of(t, port=port), 0x1234)
        assert call is not None
        ids.append(call.public_call_id)
    assert ids == [100, 101, 102, 103, 104]
    assert why(t, CLIENTS[0]) == "pool_exhausted"
    # another server has its own pool
    other = new_call(t, conn_of(t, server=SERVERS[1]), 0x1234)
    assert other is not None and other.public_call_id == 100


def test_released_ids_are_reused() -> None:
    t = table(allocation=Allocation.SEQUENTIAL, call_id_first=1, call_id_last=3)
    calls = [new_call(t, conn_of(t, port=p), 7) for p in range(3)]
    assert [c.public_call_id for c in calls if c] == [1, 2, 3]
    middle = calls[1]
    assert middle is not None
    t.release(middle, ReleaseReason.DISCONNECT)
    assert why(t, CLIENTS[0]) is None
    again = new_call(t, conn_of(t, port=9), 7)
    assert again is not None and again.public_call_id == 2


def test_sequential_cursor_continues_after_release() -> None:
    t = table(allocation=Allocation.SEQUENTIAL, call_id_first=1, call_id_last=10)
    first = new_call(t, conn_of(t, port=0), 7)
    assert first is not None and first.public_call_id == 1
    t.release(first, ReleaseReason.DISCONNECT)
    nxt = new_call(t, conn_of(t, port=1), 7)
    assert nxt is not None and nxt.public_call_id == 2  # not 1 again at once


def test_high_byte_rule_in_one_connection() -> None:
    t = table(allocation=Allocation.SEQUENTIAL)
    conn = conn_of(t)
    a = new_call(t, conn, 0x1234)
    b = new_call(t, conn, 0x1299)
    c = new_call(t, conn, 0x5678)
    assert a is not None and b is not None and c is not None
    assert a.public_call_id == 1
    assert b.public_call_id >> 8 == 0  # same client high byte: same public high byte
    assert c.public_call_id >> 8 != 0  # another client high byte: another public one
    assert conn.public_hi_for_client_hi(0x12) == 0
    assert conn.client_hi_for_public_hi(c.public_call_id >> 8) == 0x56
    assert conn.public_hi_for_client_hi(0x99) is None
    # another connection of the same client is not bound by this one's pairs: there
    # client high byte 0x12 goes with public high byte 1 (the sequential cursor's next)
    d = new_call(t, conn_of(t, port=40001), 0x1234)
    assert d is not None and d.public_call_id == c.public_call_id + 1
    assert d.public_call_id >> 8 == 1 != a.public_call_id >> 8


def test_random_draws_from_the_whole_range() -> None:
    t = table(max_calls_per_client=65535)
    ids = []
    for port in range(3000):
        call = new_call(t, conn_of(t, port=port), 0x1234)
        assert call is not None
        ids.append(call.public_call_id)
    assert len(set(ids)) == 3000
    assert min(ids) < 1000 and max(ids) > 64500
    assert len({cid >> 8 for cid in ids}) > 240  # nearly every high byte is used
    lows = sum(1 for cid in ids if cid < 32768)
    assert 1300 < lows < 1700  # about half below the middle


def test_random_fills_a_tiny_pool_completely() -> None:
    t = table(call_id_first=40000, call_id_last=40009)
    got = set()
    for port in range(10):
        call = new_call(t, conn_of(t, port=port), 1)
        assert call is not None
        got.add(call.public_call_id)
    assert got == set(range(40000, 40010))


def test_refusal_reasons_and_their_order() -> None:
    t = table(max_calls_per_client=2, max_calls=3, call_id_first=1, call_id_last=4)
    for port in range(2):
        assert new_call(t, conn_of(t, port=port), 1) is not None
    assert why(t, CLIENTS[0]) == "client_limit"
    assert why(t, CLIENTS[1]) is None
    assert why(t, CLIENTS[1], n=2) == "table_full"
    assert new_call(t, conn_of(t, CLIENTS[1]), 1) is not None
    assert why(t, CLIENTS[2]) == "table_full"
    t2 = table(call_id_first=1, call_id_last=2)
    assert why(t2, CLIENTS[0], n=3) == "pool_exhausted"


def test_connection_limit() -> None:
    t = table(max_control_connections=2)
    conn_of(t, port=1)
    conn_of(t, port=2)
    assert t.connection((CLIENTS[0], 3, SERVERS[0], 1723), 0.0, create=True) is None
    assert t.connection((CLIENTS[0], 3, SERVERS[0], 1723), 0.0, create=False) is None


def test_timers_are_a_lazy_heap() -> None:
    t = table(request_timeout=10.0, call_idle_timeout=50.0, control_idle_timeout=100.0)
    conn = conn_of(t)
    call = new_call(t, conn, 1)
    assert call is not None
    assert t.next_deadline() == 10.0
    # the server's reply, through the lifecycle table: ESTABLISHED at 5, idle timer 50
    assert t.apply(call, Direction.INBOUND, MessageType.OUTGOING_CALL_REPLY,
                   Outcome.CONNECTED, 5.0, server_call_id=0x80)
    assert call.state is CallState.ESTABLISHED
    assert list(t.expired(10.0)) == []  # re-armed at 55
    assert t.next_deadline() == 55.0
    call.last_seen = 30.0  # GRE kept it alive; the heap entry is only a lower bound
    assert list(t.expired(55.0)) == []
    assert t.next_deadline() == 80.0
    assert set(t.expired(80.0)) == {call}  # (stale duplicates may yield it twice)
    t.release(call, ReleaseReason.DISCONNECT)
    assert t.next_deadline() == 100.0
    assert list(t.expired(100.0)) == [conn]
    t.forget_connection(conn)
    assert t.next_deadline() is None


# -- limits through the translator ----------------------------------------------------------


def refused(v: Verdict, reason: str, client: str = "10.0.0.5") -> None:
    assert (v.action, v.reason) == (Action.DROP, f"refused:{reason}")
    assert [e for e in v.events if isinstance(e, CallRefused)] == [CallRefused(
        ipaddress.IPv4Address(client), None, ipaddress.IPv4Address(SERVER), Refusal(reason))]


def test_pool_exhausted_then_freed() -> None:
    tr = make_translator(call_id_first=1, call_id_last=3)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    publics = [establish(conv, cid, 0x80 + cid) for cid in (0x0101, 0x0102, 0x0103)]
    assert sorted(publics) == [1, 2, 3]
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x0104)
    v = conv.send(OUT, ocrq)
    refused(v, "pool_exhausted")
    assert tr.stats.calls_refused["pool_exhausted"] == 1
    assert tr.stats.verdicts[("drop", "refused:pool_exhausted")] == 1
    # free one: Call-Clear-Request, Call-Disconnect-Notify
    forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x0102))
    v = conv.send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x80 + 0x0102))
    assert [e.reason for e in v.events if isinstance(e, CallReleased)] == ["disconnect"]
    # the client's retransmission now goes through and gets the freed ID
    out = forward(conv, OUT, ocrq)
    assert u16(payload_of(out), 12) == publics[1]


def test_client_limit() -> None:
    tr = make_translator(max_calls_per_client=2)
    a = Conversation(tr, "10.0.0.5")
    a.open()
    establish(a, 0x1001, 0x80)
    a2 = Conversation(tr, "10.0.0.5", client_port=40001)  # a second control connection
    a2.open()
    establish(a2, 0x1002, 0x100)
    refused(a2.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1003)), "client_limit")
    b = Conversation(tr, "10.0.0.6")
    b.open()
    establish(b, 0x1003, 0x180)  # another client is not limited
    assert tr.stats.calls_refused == Counter({"client_limit": 1})


def test_table_full() -> None:
    tr = make_translator(max_calls=2)
    for i, client in enumerate(["10.0.0.5", "10.0.0.6"]):
        conv = Conversation(tr, client)
        conv.open()
        establish(conv, 0x1000, 0x80 * (i + 1))
    c = Conversation(tr, "10.0.0.7")
    c.open()
    v = c.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1000))
    refused(v, "table_full", "10.0.0.7")
    assert len(tr.calls()) == 2


def test_two_new_calls_in_one_segment_with_one_slot_left() -> None:
    tr = make_translator(max_calls=1)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    both = (msg(MT.OUTGOING_CALL_REQUEST, call_id=1) + msg(MT.OUTGOING_CALL_REQUEST, call_id=2))
    refused(conv.send(OUT, both), "table_full")
    assert tr.calls() == []
    out = forward(conv, OUT, both[:168])
    assert [type(e) for e in conv.verdicts[-1].events] == [CallMapped]
    assert u16(payload_of(out), 12) == tr.calls()[0].public_call_id


def test_too_many_connections() -> None:
    tr = make_translator(max_control_connections=1)
    Conversation(tr, "10.0.0.5").open()
    conv = Conversation(tr, "10.0.0.6")
    conv.open(start=False)
    assert [(v.action, v.reason) for v in conv.verdicts] == [
        (Action.DROP, "too_many_connections")] * 2
    # traffic that is not TCP 1723 is not affected
    udp = build_ipv4("10.0.0.6", SERVER, 17, bytes(12))
    assert tr.handle_packet(udp, OUT, 0.0) is ACCEPT


def test_no_id_for_the_high_byte_rule_tiny_pool_relaxes_it() -> None:
    # Pool 1..3 has one high byte (0). The first call (client 0x0001) takes it; a second
    # call on the same connection with another client high byte (0x0100) cannot keep the
    # rule: it was refused with two IDs free; now it shares the block (relaxed, counted)
    tr = make_translator(call_id_first=1, call_id_last=3)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    first = establish(conv, 0x0001, 0x80)
    second = establish(conv, 0x0100, 0x81)
    assert {first, second} <= {1, 2, 3} and first != second
    assert tr.table.relaxed == 1 and not tr.stats.calls_refused
    assert_table_consistent(tr.table, one_to_one=False)


def test_no_id_for_the_high_byte_rule_default_pool_relaxes_it_never_leaks() -> None:
    tr = make_translator(allocation=Allocation.SEQUENTIAL)
    x = Conversation(tr, "10.0.0.5")
    x.open()
    # x's call 0x0001 holds public 1 and other clients' calls hold 2..255 (restored, as
    # the allocator itself now leaves a connection's block to it): block 0x00xx is full
    tr.restore([CallRecord(
        client_address=ipaddress.IPv4Address(f"10.0.{i and 1}.{i or 5}"), client_port=40000,
        server_address=ipaddress.IPv4Address(SERVER), server_port=1723,
        public_address=ipaddress.IPv4Address(PUBLIC), public_call_id=i + 1,
        client_call_hi=0x40 if i else 0, client_call_id=0x4000 if i else 0x0001,
        server_call_id=0x100 + i if i else 0x80, state="established")
        for i in range(255)], 0.0)
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x0002)  # client high byte 0 -> block 0
    v = x.send(OUT, ocrq)
    leaked = v.accepted and u16(payload_of(v.data or x.segment(OUT, ocrq)), 12) == 0x0002
    assert not leaked
    assert v.accepted and v.data is not None  # mapped (was: refused:pool_exhausted)
    assert u16(payload_of(v.data), 12) >> 8 != 0  # in another block, the rule relaxed
    assert tr.table.relaxed == 1
    assert [e for e in v.events if isinstance(e, CallRefused)] == []


def test_refused_by_server_frees_the_id() -> None:
    tr = make_translator(call_id_first=1, call_id_last=1)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    public = u16(payload_of(forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=9))), 12)
    v = conv.send(IN, msg(MT.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=public,
                          result_code=7))
    assert [e.reason for e in v.events if isinstance(e, CallReleased)] == ["refused_by_server"]
    forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=10))
    assert [c.public_call_id for c in tr.calls()] == [1]


def test_several_new_calls_in_one_segment_relax_rather_than_leak() -> None:
    # Pool 0x00FE..0x0101: two IDs with high byte 0, two with high byte 1. The first
    # call takes one block; each of the two new calls alone would find room in the other
    # block, but together only one can keep the high bytes one-to-one.
    tr = make_translator(call_id_first=0x00FE, call_id_last=0x0101)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    first = establish(conv, 0x1234, 0x80)
    both = (msg(MT.OUTGOING_CALL_REQUEST, call_id=0x5601)
            + msg(MT.OUTGOING_CALL_REQUEST, call_id=0x7801))
    out = payload_of(forward(conv, OUT, both))
    ids = {u16(out, 12), u16(out, 168 + 12)}
    assert len(ids | {first}) == 3 and not ids & {0x5601, 0x7801}  # no private ID out
    assert tr.table.relaxed == 1
    assert_table_consistent(tr.table, one_to_one=False)
    with pytest.raises(AssertionError):
        assert_table_consistent(tr.table)
