"""Framing across TCP segments, retransmission replay, gaps and unsynced pickup.

The central promise: however the same conversation is cut into segments (one
message per segment, several per segment, one byte per segment, or split at
any offset, including between the two bytes of a Call ID field), the bytes
that leave the gateway are identical, and the Call IDs in them are right.
"""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from natedit import (
    Action,
    CallMapped,
    Direction,
    MalformedAction,
    MessageType,
    ProtocolError,
    ProtocolViolation,
)
from natedit.core.errors import Malformed
from natedit.core.stream import EDIT_BACKLOG, EDIT_WINDOW, SEQ_MOD, Stream, frame
from natedit.core.wire import TCP_ACK, TCP_SYN
from tests.pptp_flows import (
    IN,
    OUT,
    Conversation,
    Flight,
    deliver,
    forward,
    make_translator,
    msg,
    out_bytes,
    payload_of,
    run_flights,
    split_messages,
    tcp_checksum_ok,
    u16,
)

MT = MessageType
A, B, C = 0x1234, 0x1235, 0x5678
"""Client Call IDs: A and B share a high byte, C does not."""
SRV_A, SRV_B, SRV_C = 0x0080, 0x0100, 0x0180
"""The server's Call IDs (pptpd hands out 0, 128, 256, ...)."""


def outbound_calls() -> list[Flight]:
    return [
        (OUT, msg(MT.START_CONTROL_CONNECTION_REQUEST)),
        (IN, msg(MT.START_CONTROL_CONNECTION_REPLY)),
        (OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=A, serial=1)
         + msg(MT.OUTGOING_CALL_REQUEST, call_id=B, serial=2)
         + msg(MT.OUTGOING_CALL_REQUEST, call_id=C, serial=3)),
    ]


@functools.cache
def public_ids() -> tuple[int, int, int]:
    """The public Call IDs the seeded translator gives A, B and C (any cutting)."""
    out, _, tr = run_flights(outbound_calls())
    ids = [u16(m, 12) for m in split_messages(out)[1:]]
    assert {c.public_call_id for c in tr.calls()} == set(ids)
    return ids[0], ids[1], ids[2]


@functools.cache
def conversation() -> tuple[Flight, ...]:
    pa, pb, pc = public_ids()
    return (*outbound_calls(),
            (IN, msg(MT.OUTGOING_CALL_REPLY, call_id=SRV_A, peer_call_id=pa)
             + msg(MT.OUTGOING_CALL_REPLY, call_id=SRV_B, peer_call_id=pb)
             + msg(MT.OUTGOING_CALL_REPLY, call_id=SRV_C, peer_call_id=pc)),
            (OUT, msg(MT.SET_LINK_INFO, peer_call_id=SRV_A) + msg(MT.ECHO_REQUEST)),
            (IN, msg(MT.SET_LINK_INFO, peer_call_id=pa)
             + msg(MT.WAN_ERROR_NOTIFY, peer_call_id=pb) + msg(MT.ECHO_REPLY)),
            (OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=A)),
            (IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=SRV_A)),  # RFC: the PAC's Call ID
            (IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=pb)),  # variant: the public one
            (OUT, msg(MT.STOP_CONTROL_CONNECTION_REQUEST)),
            (IN, msg(MT.STOP_CONTROL_CONNECTION_REPLY)))


@functools.cache
def reference() -> tuple[bytes, bytes]:
    """The conversation delivered one message per segment."""
    flights = list(conversation())
    cut = [split_messages(data) for _, data in flights]
    out, inb, tr = run_flights(flights, cut)
    assert tr.calls() == []  # Stop-Control-Connection released B and C
    return out, inb


def test_reference_output_has_the_right_call_ids() -> None:
    pa, pb, pc = public_ids()
    assert len({pa, pb, pc}) == 3
    assert pa >> 8 == pb >> 8 != pc >> 8  # one-to-one high bytes within the connection
    out, inb = reference()
    outs = [(parse_type(m), m) for m in split_messages(out)]
    ins = [(parse_type(m), m) for m in split_messages(inb)]
    assert [u16(m, 12) for t, m in outs if t is MT.OUTGOING_CALL_REQUEST] == [pa, pb, pc]
    assert [u16(m, 14) for t, m in outs if t is MT.OUTGOING_CALL_REQUEST] == [1, 2, 3]
    assert [u16(m, 12) for t, m in outs if t is MT.SET_LINK_INFO] == [SRV_A]  # untouched
    assert [u16(m, 12) for t, m in outs if t is MT.CALL_CLEAR_REQUEST] == [pa]
    assert [(u16(m, 12), u16(m, 14)) for t, m in ins if t is MT.OUTGOING_CALL_REPLY] == [
        (SRV_A, A), (SRV_B, B), (SRV_C, C)]
    assert [u16(m, 12) for t, m in ins if t is MT.SET_LINK_INFO] == [A]
    assert [u16(m, 12) for t, m in ins if t is MT.WAN_ERROR_NOTIFY] == [B]
    assert [u16(m, 12) for t, m in ins if t is MT.CALL_DISCONNECT_NOTIFY] == [A, B]


def parse_type(m: bytes) -> MessageType:
    return MT(u16(m, 8))


def play(cut: list[list[bytes]]) -> tuple[bytes, bytes]:
    out, inb, tr = run_flights(list(conversation()), cut)
    assert tr.calls() == []
    return out, inb


def test_coalesced_flights() -> None:
    assert play([[data] for _, data in conversation()]) == reference()


def test_byte_at_a_time() -> None:
    cut = [[data[i : i + 1] for i in range(len(data))] for _, data in conversation()]
    assert play(cut) == reference()


def test_split_at_every_offset() -> None:
    """Each flight in two at every offset (others whole): 1,400 conversations."""
    flights = conversation()
    whole = [[data] for _, data in flights]
    for i, (_, data) in enumerate(flights):
        for k in range(1, len(data)):
            cut = list(whole)
            cut[i] = [data[:k], data[k:]]
            assert play(cut) == reference(), (i, k)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_cuts(data: st.DataObject) -> None:
    cut = []
    for _, flight in conversation():
        points = sorted(data.draw(st.sets(st.integers(1, len(flight) - 1), max_size=12)))
        bounds = [0, *points, len(flight)]
        cut.append([flight[a:b] for a, b in itertools.pairwise(bounds)])
    assert play(cut) == reference()


def test_call_id_field_alone_in_one_byte_segments() -> None:
    """The high byte and the low byte of every message each in a segment of their own."""
    cut = []
    for _, flight in conversation():
        pieces = []
        for m in split_messages(flight):
            pieces += [m[:12], m[12:13], m[13:14], m[14:15], m[15:16], m[16:]]
        cut.append([p for p in pieces if p])
    assert play(cut) == reference()


# -- retransmissions -------------------------------------------------------------------


def opened(**policy: object) -> Conversation:
    conv = Conversation(make_translator(**policy), "10.0.0.5")
    conv.open()
    return conv


def test_full_retransmission_gets_the_same_bytes() -> None:
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    seq = conv.out_seq
    first = forward(conv, OUT, ocrq)
    again = conv.feed(OUT, conv.segment(OUT, ocrq, seq=seq))
    assert out_bytes(again, b"") == first
    assert again.events == ()  # no second CallMapped
    assert len(conv.tr.calls()) == 1


def test_retransmission_of_split_call_id() -> None:
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    seq = conv.out_seq
    first_hi = forward(conv, OUT, ocrq[:13])
    first_lo = forward(conv, OUT, ocrq[13:])
    public = conv.tr.calls()[0].public_call_id
    assert payload_of(first_hi)[12] == public >> 8
    assert payload_of(first_lo)[0] == public & 0xFF
    # each piece again, then the whole message re-segmented as one
    assert out_bytes(conv.feed(OUT, conv.segment(OUT, ocrq[:13], seq=seq)), b"") == first_hi
    assert out_bytes(conv.feed(OUT, conv.segment(OUT, ocrq[13:], seq=seq + 13)), b"") == first_lo
    whole = out_bytes(conv.feed(OUT, conv.segment(OUT, ocrq, seq=seq)), b"")
    assert tcp_checksum_ok(whole)
    assert payload_of(whole) == payload_of(first_hi) + payload_of(first_lo)
    assert u16(payload_of(whole), 12) == public
    assert len(conv.tr.calls()) == 1


def test_partially_old_and_new() -> None:
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    ccr = msg(MT.CALL_CLEAR_REQUEST, call_id=A)
    seq = conv.out_seq
    first = payload_of(forward(conv, OUT, ocrq[:100]))
    public = conv.tr.calls()[0].public_call_id
    # a resend of the first 100 bytes with the rest and the next message behind them
    v = conv.feed(OUT, conv.segment(OUT, ocrq + ccr, seq=seq))
    got = out_bytes(v, b"")
    assert tcp_checksum_ok(got)
    body = payload_of(got)
    assert body[:100] == first
    assert u16(body, 12) == public and u16(body, 168 + 12) == public
    assert [type(e) for e in v.events] == [CallMapped]  # the request completed once
    assert conv.tr.calls()[0].state == "closing"
    # and the whole of it once more: all old now
    again = conv.feed(OUT, conv.segment(OUT, ocrq + ccr, seq=seq))
    assert out_bytes(again, b"") == got and again.events == ()


def test_retransmission_of_an_inbound_reply() -> None:
    conv = opened()
    public = u16(payload_of(forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=A))), 12)
    ocrp = msg(MT.OUTGOING_CALL_REPLY, call_id=SRV_A, peer_call_id=public)
    seq = conv.in_seq
    first = forward(conv, IN, ocrp)
    assert u16(payload_of(first), 14) == A
    again = conv.feed(IN, conv.segment(IN, ocrp, seq=seq))
    assert out_bytes(again, b"") == first


def test_unchanged_retransmission_is_plain_accept() -> None:
    conv = opened()
    echo = msg(MT.ECHO_REQUEST)
    seq = conv.out_seq
    forward(conv, OUT, echo)
    v = conv.feed(OUT, conv.segment(OUT, echo, seq=seq))
    assert v.accepted and v.data is None and v.reason is None


def test_sequence_wraparound_inside_a_call_id() -> None:
    # The Call ID's high byte is the last byte before 2**32, its low byte the first after.
    conv = Conversation(make_translator(), "10.0.0.5", out_seq=SEQ_MOD - 13)
    conv.open()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    out = deliver(conv, OUT, [ocrq[:13], ocrq[13:]])
    public = conv.tr.calls()[0].public_call_id
    assert u16(out, 12) == public
    again = conv.feed(OUT, conv.segment(OUT, ocrq, seq=SEQ_MOD - 13))
    assert payload_of(out_bytes(again, b"")) == out
    more = forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=A))
    assert u16(payload_of(more), 12) == public


# -- gaps, drops and unsynced pickup ----------------------------------------------------


def test_gap_is_dropped_and_leaves_the_stream_alone() -> None:
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    ahead = conv.feed(OUT, conv.segment(OUT, ocrq, seq=conv.out_seq + 10))
    assert (ahead.action, ahead.reason) == (Action.DROP, "gap")
    assert conv.tr.calls() == []
    # also a segment whose start is ahead by one byte
    ahead = conv.feed(OUT, conv.segment(OUT, ocrq[1:], seq=conv.out_seq + 1))
    assert (ahead.action, ahead.reason) == (Action.DROP, "gap")
    public = u16(payload_of(forward(conv, OUT, ocrq)), 12)
    assert [c.public_call_id for c in conv.tr.calls()] == [public]
    assert conv.tr.stats.verdicts[("drop", "gap")] == 2


def test_gap_in_the_middle_of_a_message() -> None:
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    first = forward(conv, OUT, ocrq[:13])
    lost = conv.feed(OUT, conv.segment(OUT, ocrq[20:], seq=conv.out_seq + 7))
    assert lost.reason == "gap"
    rest = forward(conv, OUT, ocrq[13:])
    assert u16(payload_of(first)[12:13] + payload_of(rest)[:1], 0) == (
        conv.tr.calls()[0].public_call_id)


def test_unsynced_pickup_on_a_valid_header() -> None:
    conv = Conversation(make_translator(), "10.0.0.5")  # no SYN seen
    out = forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=A))
    public = conv.tr.calls()[0].public_call_id
    assert u16(payload_of(out), 12) == public
    back = forward(conv, IN, msg(MT.OUTGOING_CALL_REPLY, call_id=SRV_A, peer_call_id=public))
    assert u16(payload_of(back), 14) == A
    assert conv.tr.calls()[0].state == "established"


def test_unsynced_garbage_is_passed_then_picked_up() -> None:
    conv = Conversation(make_translator(), "10.0.0.5")
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    tail = conv.send(OUT, ocrq[50:])  # the tail of a message whose start we missed
    assert (tail.action, tail.data, tail.reason) == (Action.ACCEPT, None, "unsynced")
    short = conv.send(OUT, msg(MT.ECHO_REQUEST)[:5])  # too short to tell
    assert short.reason == "unsynced"
    conv.out_seq += 11  # the rest of that echo request went by unseen
    out = forward(conv, OUT, ocrq)
    assert u16(payload_of(out), 12) == conv.tr.calls()[0].public_call_id
    assert conv.tr.stats.verdicts[("accept", "unsynced")] == 2


def test_syn_retransmission_keeps_the_stream() -> None:
    conv = opened()
    forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=A))
    assert len(conv.tr.calls()) == 1
    conv.feed(IN, conv.segment(IN, b"", seq=conv.in_seq - 1, flags=TCP_SYN | TCP_ACK))
    assert len(conv.tr.calls()) == 1


# -- malformed control data: drop keeps the state, pass resynchronises --------------------


def test_malformed_drop_keeps_state() -> None:
    conv = opened()
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    bad = msg(MT.ECHO_REQUEST, cookie=0)
    v = conv.send(OUT, ocrq + bad)
    assert (v.action, v.reason) == (Action.DROP, "bad_cookie")
    assert v.events == (ProtocolViolation(Malformed.BAD_COOKIE, "magic cookie 0x00000000"),)
    assert conv.tr.calls() == []  # nothing of the dropped segment was applied
    v = conv.send(OUT, msg(MT.ECHO_REQUEST, length=17))
    assert (v.action, v.reason) == (Action.DROP, "bad_length")
    out = forward(conv, OUT, ocrq)  # the sender's retransmission, without the garbage
    assert u16(payload_of(out), 12) == conv.tr.calls()[0].public_call_id
    assert conv.tr.stats.verdicts[("drop", "bad_cookie")] == 1


def test_malformed_in_a_later_segment_of_a_message() -> None:
    conv = opened()
    forward(conv, OUT, msg(MT.ECHO_REQUEST)[:6])
    v = conv.send(OUT, b"\x00\x00\x00\x00\x00\x05")  # completes a header with cookie 0
    assert (v.action, v.reason) == (Action.DROP, "bad_cookie")
    forward(conv, OUT, msg(MT.ECHO_REQUEST)[6:])  # the true bytes still fit


def test_malformed_pass_goes_unsynced_then_resyncs() -> None:
    conv = opened(malformed=MalformedAction.PASS)
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=A)
    bad = msg(MT.OUTGOING_CALL_REQUEST, call_id=A, cookie=0)
    v = conv.send(OUT, bad[:40])
    assert (v.action, v.data, v.reason) == (Action.ACCEPT, None, "bad_cookie")
    assert [type(e) for e in v.events] == [ProtocolViolation]
    v = conv.send(OUT, bad[40:])  # the rest of it: no header at the start
    assert (v.action, v.data, v.reason) == (Action.ACCEPT, None, "unsynced")
    out = forward(conv, OUT, ocrq)  # the next segment that starts with a header
    assert u16(payload_of(out), 12) == conv.tr.calls()[0].public_call_id


# -- the Stream and frame() units ---------------------------------------------------------


def test_frame_two_messages_in_one_segment() -> None:
    s = Stream()
    data = msg(MT.ECHO_REQUEST) + msg(MT.CALL_CLEAR_REQUEST, call_id=A)
    pieces, pending, header = frame(s, data)
    assert [(p.header.message_type, p.start, p.at, p.end, p.complete) for p in pieces] == [
        (MT.ECHO_REQUEST, 0, 0, 16, True), (MT.CALL_CLEAR_REQUEST, 0, 16, 16, True)]
    assert (pending, header) == (b"", None)
    assert (s.pending, s.header) == (b"", None)  # frame() does not change the stream


def test_frame_header_split() -> None:
    s = Stream()
    m = msg(MT.CALL_CLEAR_REQUEST, call_id=A)
    pieces, s.pending, s.header = frame(s, m[:5])
    assert pieces == [] and s.pending == m[:5] and s.header is None
    pieces, s.pending, s.header = frame(s, m[5:14])
    assert [(p.start, p.at, p.end, p.complete) for p in pieces] == [(5, 0, 14, False)]
    assert s.header is not None and s.header.length == 16
    pieces, s.pending, s.header = frame(s, m[14:] + m[:3])
    assert [(p.start, p.at, p.end, p.complete) for p in pieces] == [(14, 0, 16, True)]
    assert pieces[0].message == m and s.pending == m[:3]


def test_frame_raises_at_the_first_bad_header_only() -> None:
    s = Stream()
    with pytest.raises(ProtocolError) as info:
        frame(s, msg(MT.ECHO_REQUEST) + msg(MT.ECHO_REQUEST, cookie=1))
    assert info.value.reason == "bad_cookie"
    assert (s.pending, s.header) == (b"", None)


def test_record_and_replay() -> None:
    s = Stream()
    s.record(SEQ_MOD - 1, 0xAB)
    s.record(0, 0xCD)
    assert s.replay(SEQ_MOD - 2, 4) == [(1, 0xAB), (2, 0xCD)]
    assert s.replay(0, 1) == [(0, 0xCD)]
    assert s.replay(1, 100) == []
    s.record(EDIT_WINDOW + 5, 0x01)  # the first two are now beyond the window
    assert list(s.edits) == [(EDIT_WINDOW + 5, 0x01)]


def test_record_backlog_is_bounded() -> None:
    s = Stream()
    for i in range(EDIT_BACKLOG + 10):
        s.record(i, i & 0xFF)
    assert len(s.edits) == EDIT_BACKLOG and s.edits[0][0] == 10


def test_resync_forgets_the_partial_message() -> None:
    s = Stream()
    s.pending, s.partial[12] = b"abc", True
    s.resync(7)
    assert (s.next_seq, s.pending, s.header, s.partial, s.new_call) == (7, b"", None, {}, None)


def test_ack_without_payload_is_plain_accept() -> None:
    conv = opened()
    v = conv.feed(OUT, conv.segment(OUT, b"", flags=TCP_ACK))
    assert v.accepted and v.data is None and v.reason is None


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_cuts_with_retransmissions(data: st.DataObject) -> None:
    """Random segments, each perhaps preceded by a resend of earlier bytes (old only, or
    old and new together): every byte leaves exactly as in the reference, every time."""
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    base = {OUT: conv.out_seq, IN: conv.in_seq}
    stream = {OUT: b"", IN: b""}
    delivered = {OUT: 0, IN: 0}
    seen: dict[Direction, dict[int, int]] = {OUT: {}, IN: {}}

    def send(d: Direction, a: int, b: int) -> None:
        pkt = conv.segment(d, stream[d][a:b], seq=base[d] + a)
        v = conv.feed(d, pkt)
        body = payload_of(out_bytes(v, pkt))
        assert tcp_checksum_ok(out_bytes(v, pkt))
        for i, byte in enumerate(body):
            assert seen[d].setdefault(a + i, byte) == byte, (d, a + i)
        delivered[d] = max(delivered[d], b)

    for d, flight in conversation():
        stream[d] += flight
        end = len(stream[d])
        while delivered[d] < end:
            # (draws shrink toward whole flights and no resends)
            if delivered[d] and data.draw(st.integers(0, 3)) == 3:
                a = delivered[d] - 1 - data.draw(st.integers(0, min(400, delivered[d]) - 1))
                b = data.draw(st.integers(a + 1, min(end, delivered[d] + 200)))
                event("resend: old and new" if b > delivered[d] else "resend: old only")
                send(d, a, b)
                continue
            b = end - data.draw(st.integers(0, end - delivered[d] - 1))
            send(d, delivered[d], b)
    out, inb = reference()
    assert bytes(seen[OUT][i] for i in range(len(out))) == out
    assert bytes(seen[IN][i] for i in range(len(inb))) == inb
    assert tr.calls() == []
