"""Hostile and confused control traffic: every case has a verdict and a counted reason.

The cases of the security issue, one by one: bad Length values, a wrong magic
cookie, control message types 0 and above 15, the PPTP management type, a
Call-Clear-Request or a reply for a call that does not exist or that is another
client's, a second Outgoing-Call-Request reusing a live Call ID, and messages
before Start-Control-Connection. Headers are crafted with ``struct`` here (the
field layout of RFC 2637 section 2.1), bodies with natedit's builder.
"""

from __future__ import annotations

import struct

import pytest

from natedit import Action, CallRefused, CallReleased, MalformedAction, MessageType
from natedit.core.translator import Translator
from natedit.core.wire import MAGIC_COOKIE, TCP_ACK, TCP_SYN, build_tcp
from tests.pptp_flows import (
    IN,
    OUT,
    SERVER,
    Conversation,
    assert_table_consistent,
    establish,
    forward,
    gre_in,
    gre_out,
    make_translator,
    msg,
    payload_of,
    u16,
)

MT = MessageType
OCRQ_LEN = 168


def header(length: int, *, pptp_type: int = 1, cookie: int = MAGIC_COOKIE,
           ctype: int = MT.OUTGOING_CALL_REQUEST, body: int | None = None) -> bytes:
    """A 12-byte control header followed by ``body`` zero bytes (default: up to Length,
    at most 200)."""
    head = struct.pack("!HHIHH", length, pptp_type, cookie, ctype, 0)
    n = body if body is not None else max(0, min(length, 200) - 12)
    return head + bytes(n)


MALFORMED: list[tuple[str, bytes, str]] = [
    ("Length 0", header(0, body=156), "bad_length"),
    ("Length below 12", header(7, body=156), "bad_length"),
    ("Length 12, below the type's size", header(12, body=156), "bad_length"),
    ("Length below the type's size", header(OCRQ_LEN - 1), "bad_length"),
    ("Length above the type's size", header(OCRQ_LEN + 1), "bad_length"),
    ("Length huge", header(0xFFFF), "bad_length"),
    ("Length huge, 4 bytes after the header", header(0xFFFF, body=4), "bad_length"),
    ("wrong magic cookie", header(OCRQ_LEN, cookie=0x1A2B3C4E), "bad_cookie"),
    ("magic cookie zero", header(OCRQ_LEN, cookie=0), "bad_cookie"),
    ("control message type 0", header(OCRQ_LEN, ctype=0), "bad_message_type"),
    ("control message type 16", header(OCRQ_LEN, ctype=16), "bad_message_type"),
    ("control message type 0xFFFF", header(OCRQ_LEN, ctype=0xFFFF), "bad_message_type"),
    ("PPTP management message type", header(OCRQ_LEN, pptp_type=2), "bad_pptp_type"),
    ("PPTP message type 0", header(OCRQ_LEN, pptp_type=0), "bad_pptp_type"),
    ("a valid message, then Length 0", msg(MT.ECHO_REQUEST) + header(0, body=20),
     "bad_length"),
]


def opened(tr: Translator | None = None, client: str = "10.0.0.5",
           port: int = 40000) -> Conversation:
    conv = Conversation(tr or make_translator(), client, client_port=port)
    conv.open()
    return conv


@pytest.mark.parametrize("d", [OUT, IN], ids=["outbound", "inbound"])
@pytest.mark.parametrize(("case", "payload", "reason"), MALFORMED,
                         ids=[c[0] for c in MALFORMED])
@pytest.mark.parametrize("action", list(MalformedAction), ids=lambda a: a.value)
def test_malformed_header_verdict_and_count(case: str, payload: bytes, reason: str,
                                            d: object, action: MalformedAction) -> None:
    conv = opened(make_translator(malformed=action))
    tr = conv.tr
    before = len(tr.calls())
    v = conv.send(d, payload)  # type: ignore[arg-type]
    expected = Action.DROP if action is MalformedAction.DROP else Action.ACCEPT
    assert (v.action, v.reason, v.data) == (expected, reason, None), case
    assert [e.reason for e in v.events] == [reason]  # type: ignore[union-attr]
    assert tr.stats.verdicts[(expected.value, reason)] == 1
    assert len(tr.calls()) == before
    assert_table_consistent(tr.table)


def test_dropped_malformed_segment_is_dropped_again_and_the_stream_goes_on() -> None:
    conv = opened()
    bad = header(0, body=156)
    for n in range(1, 4):  # TCP retransmits it: same verdict, counted each time
        v = conv.feed(OUT, conv.segment(OUT, bad))
        assert (v.action, v.reason) == (Action.DROP, "bad_length")
        assert conv.tr.stats.verdicts[("drop", "bad_length")] == n
    public = establish(conv, 0x1234, 0x80)  # the client sends something valid instead
    assert conv.tr.calls()[0].public_call_id == public


def test_length_above_the_data_waits_for_the_rest() -> None:
    """A valid header whose message continues in the next segments: accepted, framed
    across segments, the call mapped once its Call ID is in."""
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)
    first = forward(conv, OUT, ocrq[:12])
    assert payload_of(first) == ocrq[:12] and not conv.tr.calls()
    rest = forward(conv, OUT, ocrq[12:])
    assert u16(payload_of(rest), 0) == conv.tr.calls()[0].public_call_id
    assert not conv.tr.stats.verdicts


def test_fewer_than_12_bytes_wait_for_the_header() -> None:
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)
    for i in range(0, 12, 5):
        forward(conv, OUT, ocrq[i:min(i + 5, 12)])
    forward(conv, OUT, ocrq[12:])
    assert len(conv.tr.calls()) == 1


# -- Call IDs that name no call of the connection -------------------------------------------


def two_clients() -> tuple[Translator, Conversation, Conversation, int]:
    """Client A and client B, both with private Call ID 0x1234 up; B's public Call ID."""
    tr = make_translator()
    a = opened(tr, "10.0.0.5")
    b = opened(tr, "10.0.0.6")
    establish(a, 0x1234, 0x80)
    public_b = establish(b, 0x1234, 0x81)
    return tr, a, b, public_b


def b_still_flows(tr: Translator, public_b: int) -> None:
    (call,) = [c for c in tr.calls() if str(c.client_address) == "10.0.0.6"]
    assert (call.public_call_id, call.state) == (public_b, "established")
    v = tr.handle_packet(gre_in(public_b), IN, 1.0)
    assert v.accepted and v.data is not None and v.data[16:20] == bytes([10, 0, 0, 6])
    assert tr.handle_packet(gre_out("10.0.0.6", 0x81), OUT, 1.0).accepted


def test_call_clear_request_for_no_call_goes_out_as_it_came_and_is_counted() -> None:
    tr, a, _b, public_b = two_clients()
    ccrq = msg(MT.CALL_CLEAR_REQUEST, call_id=0x4321)
    out = forward(a, OUT, ccrq)
    assert payload_of(out) == ccrq
    assert tr.stats.verdicts[("accept", "unknown_call_id")] == 1
    assert len(tr.calls()) == 2 and {c.state for c in tr.calls()} == {"established"}
    b_still_flows(tr, public_b)


def test_call_clear_request_for_another_clients_private_call_id() -> None:
    """A names 0x9999, which is B's private Call ID only (on B's connection): A's
    lookups are in A's connection, so nothing of B's changes."""
    tr = make_translator()
    a = opened(tr, "10.0.0.5")
    b = opened(tr, "10.0.0.6")
    establish(a, 0x1234, 0x80)
    public_b = establish(b, 0x9999, 0x81)
    v = a.send(OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x9999))
    assert v.accepted and v.data is None  # A's message, untouched: 0x9999 is no call of A
    assert tr.stats.verdicts[("accept", "unknown_call_id")] == 1
    (call,) = [c for c in tr.calls() if str(c.client_address) == "10.0.0.6"]
    assert (call.public_call_id, call.client_call_id, call.state) == (
        public_b, 0x9999, "established")
    assert tr.handle_packet(gre_in(public_b), IN, 1.0).accepted


def test_call_clear_request_naming_another_clients_public_call_id_is_dropped() -> None:
    """Let out untouched, A's request would name B's call to the server (which sees one
    address): dropped and counted, B's call untouched."""
    tr, a, _b, public_b = two_clients()
    v = a.send(OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=public_b))
    assert (v.action, v.reason) == (Action.DROP, "foreign_call_id")
    assert tr.stats.verdicts[("drop", "foreign_call_id")] == 1
    b_still_flows(tr, public_b)
    # A's own Call-Clear-Request still works
    forward(a, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    assert {(str(c.client_address), c.state) for c in tr.calls()} == {
        ("10.0.0.5", "closing"), ("10.0.0.6", "established")}


def test_client_may_clear_its_own_call_whose_id_collides_with_a_public_one() -> None:
    # A's private Call ID equals B's public Call ID: A's own call, mapped; no drop
    tr = make_translator()
    b = opened(tr, "10.0.0.6")
    public_b = establish(b, 0x1234, 0x81)
    a = opened(tr, "10.0.0.5")
    establish(a, public_b, 0x80)
    out = forward(a, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=public_b))
    (mine,) = [c for c in tr.calls() if str(c.client_address) == "10.0.0.5"]
    assert u16(payload_of(out), 12) == mine.public_call_id
    assert mine.state == "closing"
    b_still_flows(tr, public_b)


@pytest.mark.parametrize("value", ["b_public", "b_server", "none"])
def test_disconnect_notify_on_a_connection_names_only_its_own_calls(value: str) -> None:
    """The server sends A a Call-Disconnect-Notify naming B's public or server Call ID,
    or no call at all: nothing of B's is released; A's message goes through untouched,
    counted."""
    tr, a, _b, public_b = two_clients()
    cid = {"b_public": public_b, "b_server": 0x81, "none": 0x7777}[value]
    cdn = msg(MT.CALL_DISCONNECT_NOTIFY, call_id=cid)
    v = a.send(IN, cdn)
    assert v.accepted and v.data is None and not v.events
    assert tr.stats.verdicts[("accept", "unknown_call_id")] == 1
    assert len(tr.calls()) == 2
    b_still_flows(tr, public_b)


@pytest.mark.parametrize("mt", [MT.OUTGOING_CALL_REPLY, MT.INCOMING_CALL_CONNECTED,
                                MT.WAN_ERROR_NOTIFY, MT.SET_LINK_INFO])
def test_reply_for_a_call_that_does_not_exist(mt: MessageType) -> None:
    """An inbound message whose Peer's Call ID is no call of the connection (also B's
    public Call ID on A's connection): no call created or changed, untouched, counted."""
    tr, a, _b, public_b = two_clients()
    for peer in (0x7777, public_b):
        v = a.send(IN, msg(mt, call_id=0x90, peer_call_id=peer))
        assert v.accepted and v.data is None and not v.events
    assert tr.stats.verdicts[("accept", "unknown_call_id")] == 2
    assert len(tr.calls()) == 2
    b_still_flows(tr, public_b)
    assert_table_consistent(tr.table)


def test_second_outgoing_call_request_reusing_a_live_call_id() -> None:
    """Same connection, same Call ID again: the old mapping is released (``replaced``)
    and the new request gets a new public Call ID. B, with the same private Call ID on
    its own connection, is untouched."""
    tr, a, _b, public_b = two_clients()
    (old,) = [c for c in tr.calls() if str(c.client_address) == "10.0.0.5"]
    v = a.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    released = [e for e in v.events if isinstance(e, CallReleased)]
    assert [(e.call.public_call_id, e.reason) for e in released] == [
        (old.public_call_id, "replaced")]
    assert tr.stats.calls_released["replaced"] == 1
    (new,) = [c for c in tr.calls() if str(c.client_address) == "10.0.0.5"]
    assert new.public_call_id != old.public_call_id and new.state == "requested"
    assert not tr.handle_packet(gre_in(old.public_call_id), IN, 1.0).accepted
    b_still_flows(tr, public_b)
    assert_table_consistent(tr.table)


# -- before Start-Control-Connection ---------------------------------------------------------


def test_calls_before_start_control_connection_are_refused() -> None:
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")
    conv.open(start=False)
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)
    for n in range(1, 3):  # and its retransmission
        v = conv.feed(OUT, conv.segment(OUT, ocrq))
        assert (v.action, v.reason) == (Action.DROP, "refused:not_started")
        assert tr.stats.verdicts[("drop", "refused:not_started")] == n
    assert [type(e) for e in conv.verdicts[-2].events] == [CallRefused]
    assert tr.stats.calls_refused["not_started"] == 1  # once per request
    assert not tr.calls()
    # other messages pass as usual
    for m in (msg(MT.ECHO_REQUEST), msg(MT.SET_LINK_INFO)):
        assert conv.send(OUT, m).accepted
    assert conv.send(OUT, msg(MT.START_CONTROL_CONNECTION_REQUEST)).accepted
    establish(conv, 0x1234, 0x80)
    assert len(tr.calls()) == 1


def test_start_request_and_call_in_one_segment() -> None:
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")
    conv.open(start=False)
    forward(conv, OUT, msg(MT.START_CONTROL_CONNECTION_REQUEST)
            + msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    assert len(tr.calls()) == 1


def test_inbound_call_before_start_is_refused() -> None:
    # the client is a PAC: an Incoming-Call-Request it sends before any start
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")
    conv.open(start=False)
    v = conv.send(OUT, msg(MT.INCOMING_CALL_REQUEST, call_id=0x10))
    assert (v.action, v.reason) == (Action.DROP, "refused:not_started")


def test_a_connection_picked_up_mid_stream_counts_as_started() -> None:
    """natedit (re)started while the connection was up: it never sees the start, so it
    cannot hold calls back."""
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")  # no SYN seen
    establish(conv, 0x1234, 0x80)
    assert len(tr.calls()) == 1


def test_reused_four_tuple_must_start_again() -> None:
    tr = make_translator()
    conv = opened(tr)
    establish(conv, 0x1234, 0x80)
    conv.out_seq = 90_000
    conv.feed(OUT, build_tcp(conv.client, SERVER, conv.client_port, 1723, conv.out_seq - 1,
                             flags=TCP_SYN))  # a new connection on the same 4-tuple
    assert not tr.calls()
    v = conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234), flags=TCP_ACK)
    assert (v.action, v.reason) == (Action.DROP, "refused:not_started")


# -- a Call ID field cut between two segments (issue 11, item 2) ---------------------------


def test_split_call_id_naming_no_call_never_leaves_half_rewritten() -> None:
    """0x12xx names no call of A but shares its high byte with A's call 0x1234: the high
    byte leaves as A's public one; the low byte would make a value the cut decided
    (possibly another client's public Call ID), so the rest is refused, every time."""
    tr, a, _b, public_b = two_clients()
    ccrq = msg(MT.CALL_CLEAR_REQUEST, call_id=0x1299)
    first = a.send(OUT, ccrq[:13])
    assert first.accepted
    for _ in range(2):  # the sender's retransmission is refused alike
        v = a.feed(OUT, a.segment(OUT, ccrq[13:]))
        assert (v.action, v.reason) == (Action.DROP, "split_call_id")
    assert tr.stats.verdicts[("drop", "split_call_id")] == 2
    assert {c.state for c in tr.calls()} == {"established"}
    b_still_flows(tr, public_b)


def test_split_call_id_naming_another_clients_public_call_id_is_dropped() -> None:
    """A field that leaves as it came is checked as a whole one is: B's public ID."""
    tr, a, _b, public_b = two_clients()
    ccrq = msg(MT.CALL_CLEAR_REQUEST, call_id=public_b)
    assert a.send(OUT, ccrq[:13]).accepted
    v = a.feed(OUT, a.segment(OUT, ccrq[13:]))
    if public_b >> 8 == 0x12:  # (then the high byte left as A's public one)
        assert (v.action, v.reason) == (Action.DROP, "split_call_id")
    else:
        assert (v.action, v.reason) == (Action.DROP, "foreign_call_id")
    b_still_flows(tr, public_b)


@pytest.mark.parametrize("d", [OUT, IN], ids=["outbound", "inbound"])
def test_split_call_id_of_a_call_is_rewritten_whole(d: object) -> None:
    tr = make_translator()
    a = opened(tr, "10.0.0.5")
    public = establish(a, 0x1234, 0x80)
    if d is OUT:
        m, at, want = msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234), 12, public
    else:
        m, at, want = msg(MT.SET_LINK_INFO, peer_call_id=public), 12, 0x1234
    hi = a.send(d, m[: at + 1])  # type: ignore[arg-type]
    lo = a.send(d, m[at + 1 :])  # type: ignore[arg-type]
    assert hi.accepted and lo.accepted
    got = payload_of(hi.data or a.segment(d, m[: at + 1]))[at:]  # type: ignore[arg-type]
    got += payload_of(lo.data or a.segment(d, m[at + 1 :]))[:1]  # type: ignore[arg-type]
    assert u16(got, 0) == want
