"""Hostile TCP around the control stream (issue 11, items 1, 3 and 10).

A "retransmission" with other bytes than the ones natedit inspected (an Echo-Request
at sequence S that never reached the server, then a Call-Clear-Request at S naming
another client's call) went out uninspected: the stream kept only natedit's edits.

A late duplicate SYN or SYN-ACK once released every call of its connection as
``reset`` and left the stream expecting byte ISN+1 for good (every later segment a
``gap``); a TCP 1723 segment cut into IP fragments was read as a whole segment from
its first fragment, the rest parsed as a TCP header, and the stream then lost its
place. Both now change nothing: the connection, its calls and its GRE go on.
"""

from __future__ import annotations

import struct

import pytest

from natedit import Action, MessageType
from natedit.core.checksum import internet_checksum
from natedit.core.wire import TCP_ACK, TCP_SYN, build_tcp
from tests.pptp_flows import (
    IN,
    OUT,
    Conversation,
    assert_table_consistent,
    establish,
    forward,
    gre_in,
    make_translator,
    msg,
)

MT = MessageType


def conversation() -> tuple[Conversation, int]:
    conv = Conversation(make_translator(), "10.0.0.5")
    conv.open()
    public = establish(conv, 0x1234, 0x0080)
    forward(conv, OUT, msg(MT.SET_LINK_INFO, peer_call_id=0x0080))
    forward(conv, IN, msg(MT.ECHO_REQUEST))
    return conv, public


def assert_unharmed(conv: Conversation, public: int) -> None:
    """The call still gets its GRE and the stream its next in-order message."""
    assert conv.tr.handle_packet(gre_in(public), IN, conv.now).accepted
    assert forward(conv, OUT, msg(MT.ECHO_REQUEST))
    assert forward(conv, IN, msg(MT.ECHO_REPLY))
    assert len(conv.tr.calls()) == 1
    assert_table_consistent(conv.tr.table)


@pytest.mark.parametrize("d", [OUT, IN], ids=["syn", "syn-ack"])
def test_a_late_duplicate_syn_changes_nothing(d: object) -> None:
    conv, public = conversation()
    # the SYN (SYN-ACK) Conversation.open sent: one before the Start-Control-Connection
    # message that began the stream at 1000 (5000)
    if d is OUT:
        isn = 1000 - len(msg(MT.START_CONTROL_CONNECTION_REQUEST)) - 1
        dup = build_tcp(conv.client, conv.server, conv.client_port, 1723, isn, flags=TCP_SYN)
    else:
        isn = 5000 - len(msg(MT.START_CONTROL_CONNECTION_REPLY)) - 1
        dup = build_tcp(conv.server, conv.client, 1723, conv.client_port, isn,
                        flags=TCP_SYN | TCP_ACK)
    for _ in range(2):  # late, and then again
        v = conv.feed(d, dup)  # type: ignore[arg-type]
        assert v.action is Action.ACCEPT and v.data is None and v.reason == "duplicate_syn", v
    assert conv.tr.stats.verdicts[("accept", "duplicate_syn")] == 2
    assert conv.tr.stats.calls_released["reset"] == 0
    assert_unharmed(conv, public)


def test_a_syn_with_another_isn_is_still_a_reused_tuple() -> None:
    conv, _ = conversation()
    v = conv.feed(OUT, build_tcp(conv.client, conv.server, conv.client_port, 1723, 777,
                                 flags=TCP_SYN))
    assert v.accepted and v.reason is None
    assert conv.tr.calls() == []  # released as reset, as before
    assert conv.tr.stats.calls_released["reset"] == 1


def fragments(packet: bytes, cut: int) -> list[bytes]:
    """``packet`` (20-byte IP header) as two IP fragments, the first carrying ``cut``
    bytes (a multiple of 8) of the IP payload."""
    head, body = bytearray(packet[:20]), packet[20:]
    out = []
    for off, chunk, more in ((0, body[:cut], True), (cut, body[cut:], False)):
        h = bytearray(head)
        struct.pack_into("!H", h, 2, 20 + len(chunk))
        struct.pack_into("!H", h, 6, (0x2000 if more else 0) | off // 8)
        struct.pack_into("!H", h, 10, 0)
        struct.pack_into("!H", h, 10, internet_checksum(bytes(h)))
        out.append(bytes(h) + chunk)
    return out


@pytest.mark.parametrize("d", [OUT, IN], ids=["outbound", "inbound"])
@pytest.mark.parametrize("cut", [8, 24, 64])
def test_tcp_1723_fragments_are_fragments(d: object, cut: int) -> None:
    conv, public = conversation()
    other = 0x0BAD if d is IN else public  # a Call-Clear-Request naming a Call ID
    packet = conv.segment(d, msg(MT.CALL_CLEAR_REQUEST, call_id=other))  # type: ignore[arg-type]
    first, rest = fragments(packet, cut)
    v1 = conv.feed(d, first)  # type: ignore[arg-type]
    v2 = conv.feed(d, rest)  # type: ignore[arg-type]
    assert v1.action is Action.DROP and v1.reason == "fragment", v1
    assert v2.action is Action.ACCEPT and v2.data is None and v2.reason == "not_ours", v2
    assert conv.tr.stats.verdicts[("drop", "fragment")] == 1
    assert_unharmed(conv, public)


def test_fragments_of_other_tcp_go_on_untouched() -> None:
    tr = make_translator()
    packet = build_tcp("10.0.0.5", "198.51.100.2", 40000, 443, 1, bytes(100))
    first, rest = fragments(packet, 32)
    for piece in (first, rest):
        v = tr.handle_packet(piece, OUT, 0.0)
        assert v.accepted and v.data is None
    assert not [k for k in tr.stats.verdicts if k[0] == "drop"]


def two_clients() -> tuple[Conversation, Conversation, int]:
    tr = make_translator()
    a = Conversation(tr, "10.0.0.5")
    a.open()
    b = Conversation(tr, "10.0.0.6")
    b.open()
    establish(a, 0x1234, 0x0080)
    other = establish(b, 0x1234, 0x0100)
    return a, b, other


def ack(conv: Conversation) -> None:
    """The server acknowledges everything the client sent."""
    conv.feed(IN, build_tcp(conv.server, conv.client, 1723, conv.client_port, conv.in_seq,
                            ack=conv.out_seq, flags=TCP_ACK))


def test_a_retransmission_that_rewrites_history_is_dropped() -> None:
    a, _, other = two_clients()
    at = a.out_seq
    echo = msg(MT.ECHO_REQUEST)  # 16 bytes, never acknowledged: the server never got it
    assert a.send(OUT, echo).accepted
    clear = msg(MT.CALL_CLEAR_REQUEST, call_id=other)  # 16 bytes too, at the same S
    assert len(clear) == len(echo)
    v = a.feed(OUT, a.segment(OUT, clear, seq=at))
    assert v.action is Action.DROP and v.reason == "history_rewritten", v
    # sent normally, the same message is refused as naming another client's call
    v = a.feed(OUT, a.segment(OUT, clear))
    assert v.action is Action.DROP and v.reason == "foreign_call_id", v
    # a true retransmission of the Echo-Request still goes, and the stream goes on
    assert a.feed(OUT, a.segment(OUT, echo, seq=at)).accepted
    assert forward(a, OUT, msg(MT.ECHO_REQUEST))
    assert len(a.tr.calls()) == 2


def test_a_rewritten_call_request_is_never_let_out_unmapped() -> None:
    a, _, _ = two_clients()
    at = a.out_seq
    request = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x7777)
    echoes = msg(MT.ECHO_REQUEST) * 11  # 176 bytes: the request's 168 fall inside them
    assert a.send(OUT, echoes).accepted
    v = a.feed(OUT, a.segment(OUT, request, seq=at))
    assert v.action is Action.DROP and v.reason == "history_rewritten", v
    assert 0x7777 not in {c.client_call_id for c in a.tr.calls()}


def test_acknowledged_bytes_are_not_checked() -> None:
    """The receiver discards bytes it acknowledged, whatever a retransmission holds."""
    a, _, _ = two_clients()
    at = a.out_seq
    echo = msg(MT.ECHO_REQUEST)
    assert a.send(OUT, echo).accepted
    ack(a)
    v = a.feed(OUT, a.segment(OUT, bytes(len(echo)), seq=at))
    assert v.accepted and v.reason is None, v
    assert forward(a, OUT, msg(MT.ECHO_REQUEST))
