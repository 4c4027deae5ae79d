"""The gateway's own PPTP client (issue 16 item 3): natedit queues its control
connection too (OUTPUT, INPUT: :mod:`natedit.rules`) and maps its calls like an inside
client's, its "private" address being a public one, so that no inside call is given the
Call ID the gateway's own call uses toward the same server."""

from __future__ import annotations

import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

from natedit import Policy, Translator
from natedit.core.errors import PassReason, RestoreOutcome
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

A = IPv4Address(PUBLIC)
GATEWAY_CALL_ID = 0x4321


def translator(**kw: object) -> Translator:
    policy = Policy(public_address=A, **kw)  # type: ignore[arg-type]
    return Translator(policy, rng=random.Random(3))


def conversation(tr: Translator, client: str, port: int = 40000) -> Conversation:
    conv = Conversation(tr, client, client_port=port)
    conv.open()
    return conv


def test_the_gateways_call_is_mapped_outside_the_range_left_to_inside_clients() -> None:
    """The range is the one Call ID the gateway's own call uses: the inside call gets it
    whichever comes first, the gateway's call another; inbound GRE of each reaches its
    own client (the gateway's: the public address itself, its own Call ID)."""
    for gateway_first in (True, False):
        tr = translator(call_id_first=GATEWAY_CALL_ID, call_id_last=GATEWAY_CALL_ID)
        inside, gateway = conversation(tr, "10.0.0.5"), conversation(tr, PUBLIC, 40001)
        order = [(gateway, 0x80), (inside, 0x81)]
        got = {id(c): establish(c, GATEWAY_CALL_ID, s)
               for c, s in (order if gateway_first else order[::-1])}
        assert got[id(inside)] == GATEWAY_CALL_ID
        own = got[id(gateway)]
        assert own != GATEWAY_CALL_ID and 1 <= own <= 0xFFFF
        for public_cid, client in ((GATEWAY_CALL_ID, "10.0.0.5"), (own, PUBLIC)):
            v = tr.handle_packet(build_gre(SERVER, PUBLIC, public_cid, b"\xff\x03"), IN, 1.0)
            assert v.accepted and v.data is not None
            assert IPv4Address(v.data[16:20]) == IPv4Address(client)
            assert v.data[26:28] == GATEWAY_CALL_ID.to_bytes(2, "big")
        by_client = {str(c.client_address): c for c in tr.calls()}
        assert by_client[PUBLIC].public_address == A
        assert_table_consistent(tr.table)


def test_with_the_whole_range_the_gateways_call_shares_the_pool() -> None:
    tr = translator(allocation="sequential")
    first = establish(conversation(tr, "10.0.0.5"), 1, 0x80)
    second = establish(conversation(tr, PUBLIC, 40001), 1, 0x81)
    assert first != second


def test_the_gateways_call_has_no_kernel_route() -> None:
    """Its GRE is delivered locally: the kernel program (which redirects to an interface)
    never gets its route, so it stays in the queue's path."""
    tr = translator()
    establish(conversation(tr, "10.0.0.5"), 0x1234, 0x80)
    own = establish(conversation(tr, PUBLIC, 40001), 0x1234, 0x81)
    assert [IPv4Address(r.client_ip) for r in tr.gre_routes()] == [IPv4Address("10.0.0.5")]
    assert tr.gre_route((A.packed, IPv4Address(SERVER).packed, own)) is None


def test_the_client_acl_does_not_apply_to_the_gateway_itself() -> None:
    tr = translator(clients_allow=(IPv4Network("10.0.0.0/8"),))
    establish(conversation(tr, PUBLIC), GATEWAY_CALL_ID, 0x80)
    assert len(tr.calls()) == 1


def test_a_local_client_on_an_address_that_is_not_public_is_not_ours() -> None:
    """Only on a public address is the gateway's own client natedit's (the rules cannot
    tell its other addresses apart): on another one, its connection goes on untouched."""
    tr = translator()
    conv = conversation(tr, "192.0.2.7")
    assert all(v.accepted and v.reason is PassReason.NOT_OURS and v.data is None
               for v in conv.verdicts)
    v = conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=GATEWAY_CALL_ID))
    assert v.accepted and v.data is None and v.reason is PassReason.NOT_OURS
    assert not tr.table.connections and not tr.calls()


def test_the_gateways_outbound_gre_is_not_rewritten() -> None:
    """It leaves through OUTPUT from the public address (never queued; if it were, it
    would keep that source)."""
    tr = translator()
    establish(conversation(tr, PUBLIC), GATEWAY_CALL_ID, 0x80)
    v = tr.handle_packet(gre_out(PUBLIC, 0x80), OUT, 1.0)
    assert v.accepted
    assert v.data is None or v.data[12:16] == A.packed


def test_a_gateway_call_is_restored() -> None:
    tr = translator()
    establish(conversation(tr, PUBLIC), GATEWAY_CALL_ID, 0x80)
    (rec,) = tr.snapshot()
    assert translator().restore([rec], 1.0) == {RestoreOutcome.RESTORED: 1}
    other = IPv4Address("198.51.100.3")
    two = Translator(Policy(public_address=A, other_public_addresses=(other,)),
                     rng=random.Random(1))
    assert two.restore([replace(rec, client_address=other)], 1.0) == {
        RestoreOutcome.CLIENT_ADDRESS: 1}
