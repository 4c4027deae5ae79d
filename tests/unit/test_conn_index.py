"""A control connection's call indexes (``ControlConnection.index``): every
lookup finds in O(1) what a walk of the connection's calls in order finds first,
also while several calls share a key, and after the first of them leaves.

The Hypothesis machine drives a bare :class:`ControlConnection` over tiny ID spaces
(so that keys are shared all the time) and compares every index with a walk after
every step (``tests.pptp_flows.assert_indexes_walk``, which every
``assert_table_consistent`` of the other tests runs too).
"""

from __future__ import annotations

import ipaddress
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from natedit import CallRecord, Policy
from natedit.core.errors import ReleaseReason
from natedit.core.table import (
    CLIENT_HI,
    PUBLIC_HI,
    SERVER_HI,
    SERVER_ID,
    Call,
    CallTable,
    ControlConnection,
)
from tests.pptp_flows import PUBLIC, SERVER, assert_indexes_walk, assert_table_consistent

PUB = ipaddress.IPv4Address(PUBLIC)
SRV = ipaddress.IPv4Address(SERVER).packed
CLIENT = bytes([10, 0, 0, 5])
KEY = (CLIENT, 40000, SRV, 1723)


def bare() -> ControlConnection:
    return ControlConnection(KEY, 0.0)


def join(conn: ControlConnection, client_hi: int, public_call_id: int,
         client_call_id: int | None = None, server_call_id: int | None = None) -> Call:
    call = Call(conn, client_hi, PUB, public_call_id, 0.0)
    conn.set_ids(call, client_call_id, server_call_id)
    conn.add_call(call)
    return call


def table_conn() -> tuple[CallTable, ControlConnection]:
    t = CallTable(Policy(public_address=PUB), random.Random(3))
    conn = t.connection(KEY, 0.0, create=True)
    assert conn is not None
    return t, conn


def mapped(t: CallTable, conn: ControlConnection, client_call_id: int) -> Call:
    call = t.allocate(conn, client_call_id >> 8, PUB.packed, 0.0)
    assert call is not None
    conn.set_ids(call, client_call_id=client_call_id)
    return call


# -- two calls, one server Call ID (pptpd's wrap; issue 11 item 8) ---------------------------

def test_two_calls_one_server_call_id_the_first_mapped_wins_whoever_was_answered_first() -> None:
    """The walk finds the call mapped first, not the one answered first; the table's
    outbound key is the latest holder's (``_shadowed``): both as before the index."""
    t, conn = table_conn()
    a, b = mapped(t, conn, 0x0101), mapped(t, conn, 0x0102)
    t.set_server_call_id(b, 0x80)  # the later call is answered first ...
    assert conn.call_by_server_id(0x80) is b
    t.set_server_call_id(a, 0x80)  # ... then the earlier one gets the same ID
    assert conn.call_by_server_id(0x80) is a
    assert t.by_server[(CLIENT, SRV, 0x80)] is a and t._shadowed[(CLIENT, SRV, 0x80)] == [b]
    assert list(conn.calls_with(SERVER_ID | 0x80)) == [a, b]
    assert_table_consistent(t, one_to_one=False)
    t.release(a, ReleaseReason.DISCONNECT)  # the first leaves: the other is found
    assert conn.call_by_server_id(0x80) is b and t.by_server[(CLIENT, SRV, 0x80)] is b
    assert_table_consistent(t, one_to_one=False)
    t.release(b, ReleaseReason.DISCONNECT)
    assert conn.call_by_server_id(0x80) is None and not conn.calls_with(SERVER_ID | 0x80)
    assert not conn.calls and not conn.index


def test_three_calls_share_a_server_call_id_and_leave_in_any_order() -> None:
    t, conn = table_conn()
    a, b, c = (mapped(t, conn, cid) for cid in (0x0201, 0x0202, 0x0203))
    for call in (c, a, b):
        t.set_server_call_id(call, 0x4242)
    assert list(conn.calls_with(SERVER_ID | 0x4242)) == [a, b, c]
    t.release(b, ReleaseReason.DISCONNECT)  # the middle one: the first stays first
    assert conn.call_by_server_id(0x4242) is a
    t.release(a, ReleaseReason.DISCONNECT)
    assert conn.call_by_server_id(0x4242) is c
    assert_table_consistent(t, one_to_one=False)


def test_a_new_server_call_id_moves_the_call_in_the_index() -> None:
    """A call answered again with another server Call ID is found by the new one only;
    the call that shared the old one is now first for it."""
    t, conn = table_conn()
    a, b = mapped(t, conn, 0x0301), mapped(t, conn, 0x0302)
    t.set_server_call_id(a, 0x80)
    t.set_server_call_id(b, 0x80)
    t.set_server_call_id(a, 0x81)
    assert conn.call_by_server_id(0x80) is b and conn.call_by_server_id(0x81) is a
    assert list(conn.calls_with(SERVER_HI | 0)) == [a, b]  # one high byte: both, in order
    t.set_server_call_id(a, 0x80)  # back again: first again (the connection's order)
    assert list(conn.calls_with(SERVER_ID | 0x80)) == [a, b]
    assert_table_consistent(t, one_to_one=False)


def test_a_reused_client_call_id_replaces_the_live_call_in_the_index() -> None:
    """The fields release a live call whose client Call ID a new request reuses; the
    index then names the new call (as the walk did)."""
    t, conn = table_conn()
    old = mapped(t, conn, 0x0401)
    new = t.allocate(conn, 0x04, PUB.packed, 0.0)
    assert new is not None and new.client_call_id is None
    assert conn.call_by_client_id(0x0401) is old  # the new one has no client Call ID yet
    t.release(old, ReleaseReason.REPLACED)
    conn.set_ids(new, client_call_id=0x0401)
    assert conn.call_by_client_id(0x0401) is new
    assert_table_consistent(t)


# -- the high bytes, relaxed (several calls per high byte) ---------------------------------

def test_high_byte_lookups_answer_the_first_call_and_fall_back_when_it_leaves() -> None:
    """Once the rule was relaxed a client high byte has calls in several public blocks:
    the lookups answer the first call's, then the next one's when it leaves."""
    conn = bare()
    a = join(conn, 0x12, 0x3401, 0x1201)
    b = join(conn, 0x12, 0x5601, 0x1202)
    c = join(conn, 0x77, 0x3402, 0x7701)  # shares a's public block
    assert conn.public_hi_for_client_hi(0x12) == 0x34
    assert conn.client_hi_for_public_hi(0x34) == 0x12
    assert list(conn.calls_with(CLIENT_HI | 0x12)) == [a, b]
    assert sorted(k & 0xFFFF for k in conn.index if k & ~0xFFFF == PUBLIC_HI) == [0x34, 0x56]
    assert_indexes_walk(conn)
    conn.remove_call(a)
    assert conn.public_hi_for_client_hi(0x12) == 0x56
    assert conn.client_hi_for_public_hi(0x34) == 0x77
    assert_indexes_walk(conn)
    conn.remove_call(c)
    conn.remove_call(b)
    assert conn.public_hi_for_client_hi(0x12) is None
    assert conn.client_hi_for_public_hi(0x34) is None
    assert not conn.calls and not conn.index


def test_ids_set_before_a_call_joins_are_indexed_when_it_joins() -> None:
    """The restore path: a record's Call IDs are set before the call joins."""
    conn = bare()
    call = Call(conn, 0x12, PUB, 0x3401, 0.0)
    conn.set_ids(call, 0x1234, 0x80)
    assert (call.client_call_id, call.server_call_id) == (0x1234, 0x80)
    assert conn.call_by_client_id(0x1234) is None and not conn.calls_with(SERVER_ID | 0x80)
    conn.add_call(call)
    assert conn.call_by_client_id(0x1234) is call and conn.call_by_server_id(0x80) is call
    assert_indexes_walk(conn)


def test_restored_calls_are_found_by_every_id() -> None:
    t = CallTable(Policy(public_address=PUB), random.Random(3))
    server = ipaddress.IPv4Address(SERVER)
    client = ipaddress.IPv4Address(CLIENT)
    for n, (cid, scid) in enumerate([(0x1201, 0x80), (0x1202, 0x80), (0x1301, None)]):
        rec = CallRecord(client, 40000, server, 1723, PUB, 0x3401 + n, cid >> 8, cid,
                         scid, "established")
        assert t.restore(rec, 0.0) is None
    conn = t.connections[KEY]
    first = conn.call_by_client_id(0x1201)
    assert first is not None and conn.call_by_server_id(0x80) is first
    assert conn.call_by_public_id(0x3403) is conn.call_by_client_id(0x1301)
    assert_table_consistent(t, one_to_one=False)


# -- any sequence of joins, new IDs and leaves -----------------------------------------------

class IndexMachine(RuleBasedStateMachine):
    """Tiny ID spaces: keys are shared all the time (the table's invariants, such as one
    live call per public Call ID, are not the index's: it must hold without them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = bare()

    @rule(client_hi=st.integers(0, 2), public_call_id=st.sampled_from(
        [0x0001, 0x0002, 0x0101, 0x0102, 0xFF00]),
        client_lo=st.none() | st.integers(0, 2), server_call_id=st.none() | st.integers(0, 3))
    def join(self, client_hi: int, public_call_id: int, client_lo: int | None,
             server_call_id: int | None) -> None:
        join(self.conn, client_hi, public_call_id,
             None if client_lo is None else client_hi << 8 | client_lo, server_call_id)

    @precondition(lambda self: self.conn.calls)
    @rule(which=st.integers(0, 1000), client_lo=st.integers(0, 2))
    def set_client_call_id(self, which: int, client_lo: int) -> None:
        call = list(self.conn.calls)[which % len(self.conn.calls)]
        self.conn.set_ids(call, client_call_id=call.client_call_hi << 8 | client_lo)

    @precondition(lambda self: self.conn.calls)
    @rule(which=st.integers(0, 1000), server_call_id=st.sampled_from(
        [0, 1, 2, 0x0100, 0x0101]))
    def set_server_call_id(self, which: int, server_call_id: int) -> None:
        call = list(self.conn.calls)[which % len(self.conn.calls)]
        self.conn.set_ids(call, server_call_id=server_call_id)

    @precondition(lambda self: self.conn.calls)
    @rule(which=st.integers(0, 1000))
    def leave(self, which: int) -> None:
        call = list(self.conn.calls)[which % len(self.conn.calls)]
        self.conn.remove_call(call)
        assert call not in self.conn.calls

    @invariant()
    def indexes_are_the_walk(self) -> None:
        assert_indexes_walk(self.conn)


IndexMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                          deadline=None)
test_index_machine = IndexMachine.TestCase
