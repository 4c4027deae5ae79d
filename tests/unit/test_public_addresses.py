"""Several public addresses (issue 16 item 4): each call gets the address its control
connection was NATed to, which the edge reads from conntrack and passes in
(``handle_packet(..., public)``); the core keeps it per connection."""

from __future__ import annotations

import random
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from natedit import Policy, Translator
from natedit.core.errors import DropReason, PassReason, Refusal, ReleaseReason, RestoreOutcome
from natedit.core.events import CallRefused, CallReleased
from natedit.core.wire import MessageType as MT
from natedit.core.wire import build_gre
from tests.pptp_flows import (
    IN,
    OUT,
    PUBLIC,
    SERVER,
    Conversation,
    assert_table_consistent,
    establish,
    gre_out,
    msg,
)

A, B, C = IPv4Address(PUBLIC), IPv4Address("198.51.100.3"), IPv4Address("198.51.100.9")
"""A and B are the policy's public addresses; C is none of them."""


def translator(**kw: object) -> Translator:
    policy = Policy(public_address=A, other_public_addresses=(B,), **kw)  # type: ignore[arg-type]
    return Translator(policy, rng=random.Random(16))


def conversation(tr: Translator, client: str, public: IPv4Address | None) -> Conversation:
    conv = Conversation(tr, client, public=None if public is None else public.packed)
    conv.open()
    return conv


def test_each_call_gets_the_address_its_connection_was_nated_to() -> None:
    """Same client Call ID everywhere; the one-ID range proves the pools are per
    (public address, server): both calls get Call ID 7, one on each address."""
    tr = translator(call_id_first=7, call_id_last=7)
    on_a, on_b = conversation(tr, "10.0.0.5", A), conversation(tr, "10.0.0.133", B)
    assert establish(on_a, 0x1234, 0x80) == 7
    assert establish(on_b, 0x1234, 0x81) == 7
    by_client = {str(c.client_address): c for c in tr.calls()}
    assert by_client["10.0.0.5"].public_address == A
    assert by_client["10.0.0.133"].public_address == B
    # inbound GRE to each address reaches its own client with the client's Call ID
    for public, client in ((A, "10.0.0.5"), (B, "10.0.0.133")):
        v = tr.handle_packet(build_gre(SERVER, str(public), 7, b"\xff\x03"), IN, 1.0)
        assert v.accepted and v.data is not None
        assert IPv4Address(v.data[16:20]) == IPv4Address(client)
        assert v.data[26:28] == b"\x12\x34"
    # outbound GRE leaves with its call's address
    v = tr.handle_packet(gre_out("10.0.0.133", 0x81), OUT, 1.0)
    assert v.data is not None and IPv4Address(v.data[12:16]) == B
    assert tr.gre_out_fast(gre_out("10.0.0.5", 0x80), 1.0)[12:16] == A.packed  # type: ignore[index]
    # the pool of A is full; B's too: a third client on A is refused
    third = conversation(tr, "10.0.0.6", A)
    assert not third.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)).accepted
    assert tr.stats.calls_refused[Refusal.POOL_EXHAUSTED] == 1
    assert sorted(tr.table.ids_in_use()) == sorted([(A.packed, IPv4Address(SERVER).packed, 1),
                                                    (B.packed, IPv4Address(SERVER).packed, 1)])
    assert_table_consistent(tr.table)


def test_gre_to_an_address_natedit_does_not_own_is_not_ours() -> None:
    tr = translator()
    establish(conversation(tr, "10.0.0.5", B), 0x1234, 0x80)
    v = tr.handle_packet(build_gre(SERVER, str(C), 1, b"\xff\x03"), IN, 1.0)
    assert v.accepted and v.data is None and v.reason is PassReason.NOT_OURS


def test_a_connection_nated_to_another_address_gets_its_calls_refused() -> None:
    """Never mapped to a wrong address: counted, told, the segment dropped."""
    tr = translator()
    conv = conversation(tr, "10.0.0.5", C)
    v = conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    assert not v.accepted and v.reason is DropReason.REFUSED_NOT_PUBLIC
    assert tr.stats.calls_refused[Refusal.NOT_PUBLIC] == 1
    assert [e.reason for e in v.events if isinstance(e, CallRefused)] == [Refusal.NOT_PUBLIC]
    assert not tr.calls()
    # a client not NATed at all (its own address) is the same refusal
    plain = conversation(tr, "10.0.0.6", IPv4Address("10.0.0.6"))
    assert plain.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=1)).reason is (
        DropReason.REFUSED_NOT_PUBLIC)


def test_without_the_edge_calls_take_the_first_address() -> None:
    """``natedit replay`` and a worker that cannot read conntrack: the first address."""
    tr = translator()
    establish(conversation(tr, "10.0.0.5", None), 0x1234, 0x80)
    assert [c.public_address for c in tr.calls()] == [A]


def test_a_connection_whose_nat_address_changes_ends_its_calls() -> None:
    """An uplink failover: the calls mapped to the old address end, told with their
    reason; the connection's next calls take the new address."""
    tr = translator()
    conv = conversation(tr, "10.0.0.5", A)
    establish(conv, 0x1234, 0x80)
    establish(conv, 0x2345, 0x90)
    conv.public = B.packed
    v = conv.send(OUT, msg(MT.ECHO_REQUEST))
    assert v.accepted
    released = [e for e in v.events if isinstance(e, CallReleased)]
    assert [e.reason for e in released] == [ReleaseReason.PUBLIC_ADDRESS_CHANGED] * 2
    assert {e.call.public_address for e in released} == {A}
    assert not tr.calls() and tr.stats.calls_released[ReleaseReason.PUBLIC_ADDRESS_CHANGED] == 2
    establish(conv, 0x3456, 0xA0)
    assert [c.public_address for c in tr.calls()] == [B]
    # the same address again changes nothing
    assert not [e for e in conv.send(OUT, msg(MT.ECHO_REQUEST)).events
                if isinstance(e, CallReleased)]
    assert_table_consistent(tr.table)


def test_restore_takes_calls_on_any_public_address() -> None:
    tr = translator()
    establish(conversation(tr, "10.0.0.5", A), 0x1234, 0x80)
    establish(conversation(tr, "10.0.0.133", B), 0x1234, 0x81)
    records = tr.snapshot()
    foreign = replace(records[0], public_address=C, client_port=40001)
    again = translator()
    outcome = again.restore([*records, foreign], 5.0)
    assert outcome == {RestoreOutcome.RESTORED: 2, RestoreOutcome.PUBLIC_ADDRESS: 1}
    assert sorted(str(c.public_address) for c in again.calls()) == [str(A), str(B)]
    # the restored connections keep their addresses: their next calls too
    conn = again.table.connections[(IPv4Address("10.0.0.133").packed, 40000,
                                    IPv4Address(SERVER).packed, 1723)]
    assert conn.public_ip == B.packed
    # a record on a second address for a connection that has one is refused
    other = replace(records[1], public_address=A, public_call_id=0x4242, client_call_id=0x5555,
                    client_call_hi=0x55, server_call_id=None)
    assert again.restore([other], 6.0) == {RestoreOutcome.PUBLIC_ADDRESS: 1}
    # a single-address policy refuses calls on an address it does not have
    single = Translator(Policy(public_address=A), rng=random.Random(1))
    assert single.restore(records, 5.0) == {RestoreOutcome.RESTORED: 1,
                                            RestoreOutcome.PUBLIC_ADDRESS: 1}


def test_a_client_or_server_at_any_public_address_is_refused_at_restore() -> None:
    tr = translator()
    establish(conversation(tr, "10.0.0.5", A), 0x1234, 0x80)
    (rec,) = tr.snapshot()
    assert translator().restore([replace(rec, server_address=B)], 1.0) == {
        RestoreOutcome.SERVER_ADDRESS: 1}


def test_the_public_addresses_cannot_change_on_reload() -> None:
    tr = translator()
    tr.set_policy(replace(tr.policy, max_calls=9))
    with pytest.raises(ValueError, match="public addresses cannot change"):
        tr.set_policy(replace(tr.policy, other_public_addresses=(C,)))
