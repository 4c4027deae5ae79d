"""The malformed-input promise, fuzzed briefly (a CI-sized run, ~2,000 examples).

* ``parse_control_header``, ``parse_control_message``, ``parse_gre`` and
  ``parse_ipv4`` either return or raise :class:`ProtocolError`; never
  ``struct.error``, ``IndexError`` or anything else.
* ``Translator.handle_packet`` never raises, in either direction, for
  arbitrary bytes and for mutated packets of live conversations; every drop
  has a reason, every rewrite keeps the length and keeps valid checksums
  valid, and the call table stays consistent.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from natedit import (
    Action,
    Direction,
    DisconnectRule,
    MalformedAction,
    MessageType,
    ProtocolError,
    ProtocolViolation,
    Verdict,
)
from natedit.core.errors import DropReason, Malformed, PassReason, Refusal, ReleaseReason
from natedit.core.translator import Translator
from natedit.core.wire import (
    MESSAGE_LENGTH,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    build_control_message,
    build_gre,
    build_ipv4,
    parse_control_header,
    parse_control_message,
    parse_gre,
    parse_ipv4,
)
from tests.pptp_flows import (
    IN,
    OUT,
    PUBLIC,
    SERVER,
    Conversation,
    assert_table_consistent,
    ip_checksum_ok,
    make_translator,
    tcp_checksum_ok,
)

MT = MessageType
SCALE = int(os.environ.get("NATEDIT_FUZZ_SCALE", "1"))
"""Multiply every example count, for a longer run by hand (NATEDIT_FUZZ_SCALE=50)."""
FUZZ = settings(max_examples=400 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

call_ids = st.one_of(st.sampled_from([0, 1, 0x80, 0x100, 0x1234, 0x1235, 0x5678, 0xFFFF]),
                     st.integers(0, 0xFFFF))
messages = st.builds(
    lambda mt, cid, peer, res: build_control_message(mt, call_id=cid, peer_call_id=peer,
                                                     result_code=res),
    st.sampled_from(list(MT)), call_ids, call_ids, st.sampled_from([1, 1, 2, 0]))


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` with a few byte changes, then perhaps truncated or extended."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["keep", "keep", "cut", "extend"]))
    if how == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "extend":
        data += draw(st.binary(max_size=24))
    return bytes(data)


PROTOCOL_REASONS = {
    "short_header", "bad_pptp_type", "bad_cookie", "bad_message_type", "bad_length",
    "length_mismatch", "short_ip", "not_ipv4", "bad_ip_header", "short_gre", "not_pptp_gre",
    "short_tcp", "bad_tcp_header",
}
"""Every ProtocolError reason the core has: a closed set the edges can count by."""
VERDICT_REASONS = PROTOCOL_REASONS | {
    "not_ours", "unsynced", "duplicate_syn", "history_rewritten", "gap", "no_call", "fragment",
    "too_many_connections",
    "refused:client_limit", "refused:table_full", "refused:pool_exhausted",
    "refused:not_started", "foreign_call_id", "client_connection_limit",
}
"""The verdict reasons of the table in the _translator docstring."""


def only_protocol_error(fn: object, *args: object) -> None:
    assert callable(fn)
    try:
        fn(*args)
    except ProtocolError as exc:
        assert exc.reason in PROTOCOL_REASONS
        assert isinstance(exc.reason, Malformed | PassReason)


# -- the parsers ------------------------------------------------------------------------------


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), mutated(messages)),
       offset=st.integers(0, 40))
def test_control_parsers_raise_only_protocol_error(data: bytes, offset: int) -> None:
    only_protocol_error(parse_control_header, data)
    only_protocol_error(parse_control_header, data, offset)
    only_protocol_error(parse_control_message, data)
    only_protocol_error(parse_control_message, memoryview(data))


gre_packets = st.builds(
    lambda cid, payload, seq, ack: build_gre(SERVER, PUBLIC, cid, payload, seq=seq, ack=ack),
    call_ids, st.binary(max_size=16), st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)))


@FUZZ
@given(data=st.one_of(st.binary(max_size=120), mutated(gre_packets)),
       offset=st.integers(0, 40))
def test_ip_and_gre_parsers_raise_only_protocol_error(data: bytes, offset: int) -> None:
    only_protocol_error(parse_ipv4, data)
    only_protocol_error(parse_ipv4, bytearray(data))
    only_protocol_error(parse_gre, data)
    only_protocol_error(parse_gre, data, offset)
    only_protocol_error(parse_gre, data, 20)


# -- the translator -----------------------------------------------------------------------------


def check_verdict(v: Verdict, packet: bytes) -> None:
    assert isinstance(v, Verdict)
    assert v.reason is None or v.reason in VERDICT_REASONS, v.reason
    assert v.reason is None or isinstance(v.reason, DropReason | PassReason | Malformed)
    for e in v.events:
        reason = getattr(e, "reason", None)
        assert reason is None or isinstance(reason, ReleaseReason | Refusal | Malformed), e
    if v.action is Action.DROP:
        assert v.reason and v.data is None
    if v.data is not None:
        assert len(v.data) == len(packet)  # same-length rewrites only
        if ip_checksum_ok(packet):
            assert ip_checksum_ok(v.data)
        if packet[9] == 6 and tcp_checksum_ok(packet):
            assert tcp_checksum_ok(v.data)


def live_translator(**policy: object) -> tuple[Translator, list[Conversation]]:
    """Two clients, one established call each and one requested."""
    tr = make_translator(**policy)
    convs = []
    for i, client in enumerate(["10.0.0.5", "10.0.0.6"]):
        conv = Conversation(tr, client)
        conv.open()
        v = conv.send(OUT, build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
        public = struct.unpack_from("!H", v.data or b"", 40 + 12)[0]
        conv.send(IN, build_control_message(MT.OUTGOING_CALL_REPLY, call_id=0x80 + i,
                                            peer_call_id=public))
        conv.send(OUT, build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=0x1235))
        convs.append(conv)
    assert len(tr.calls()) == 4
    return tr, convs


@FUZZ
@given(data=st.binary(max_size=200), inbound=st.booleans())
def test_handle_packet_never_raises_on_garbage(data: bytes, inbound: bool) -> None:
    tr, _ = live_translator()
    v = tr.handle_packet(data, IN if inbound else OUT, 1.0)
    check_verdict(v, data)
    assert_table_consistent(tr.table)


ip_like = st.builds(
    lambda src, dst, proto, payload, opts: build_ipv4(src, dst, proto, payload,
                                                      options=b"\x01" * 4 * opts),
    st.sampled_from(["10.0.0.5", SERVER]), st.sampled_from([PUBLIC, SERVER, "10.0.0.5"]),
    st.sampled_from([6, 47, 17]), st.binary(max_size=60), st.integers(0, 2))


@st.composite
def step(draw: st.DrawFn, tr: Translator, convs: list[Conversation]) -> tuple[bytes, Direction]:
    """One packet for a live translator: mostly plausible, often damaged."""
    conv = draw(st.sampled_from(convs))
    publics = [c.public_call_id for c in tr.calls()] or [1]
    kind = draw(st.sampled_from(["control", "control", "gre_in", "gre_out", "ip", "tcp"]))
    if kind == "gre_in":
        base = build_gre(SERVER, PUBLIC, draw(st.one_of(st.sampled_from(publics), call_ids)),
                         draw(st.binary(max_size=8)))
        return draw(mutated(st.just(base))), IN
    if kind == "gre_out":
        base = build_gre(conv.client, SERVER, draw(st.sampled_from([0x80, 0x81, 0x1234])),
                         draw(st.binary(max_size=8)))
        return draw(mutated(st.just(base))), OUT
    if kind == "ip":
        return draw(ip_like), draw(st.sampled_from(list(Direction)))
    d = draw(st.sampled_from(list(Direction)))
    if kind == "tcp":
        flags = draw(st.sampled_from([TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST, TCP_SYN]))
        return conv.segment(d, b"", seq=draw(st.integers(0, 2**32 - 1)), flags=flags), d
    # control data: messages naming live IDs, cut anywhere, at or near the next byte
    ids = st.one_of(st.sampled_from(publics), call_ids)
    body = b"".join(draw(st.lists(st.builds(
        lambda mt, cid, peer, res: build_control_message(mt, call_id=cid, peer_call_id=peer,
                                                         result_code=res),
        st.sampled_from(list(MT)), ids, ids, st.sampled_from([1, 1, 2])), min_size=1,
        max_size=3)))
    start = draw(st.one_of(st.just(0), st.integers(0, len(body) - 1)))
    end = draw(st.one_of(st.just(len(body)), st.integers(start + 1, len(body))))
    payload = body[start:end]
    if draw(st.booleans()):
        payload = draw(mutated(st.just(payload))) or b"\x00"
    next_seq = conv.out_seq if d is OUT else conv.in_seq
    seq = next_seq + draw(st.sampled_from([0, 0, 0, -5, -(end - start), 3]))
    packet = conv.segment(d, payload, seq=seq)
    if seq == next_seq:  # in order: the conversation moves on if it is let through
        if d is OUT:
            conv.out_seq += len(payload)
        else:
            conv.in_seq += len(payload)
    return packet, d


@settings(max_examples=300 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), malformed=st.sampled_from(list(MalformedAction)),
       rule=st.sampled_from(list(DisconnectRule)), small_pool=st.booleans())
def test_handle_packet_never_raises_on_mutated_conversations(
        data: st.DataObject, malformed: MalformedAction, rule: DisconnectRule,
        small_pool: bool) -> None:
    pool = {"call_id_first": 0x40F0, "call_id_last": 0x4110} if small_pool else {}
    tr, convs = live_translator(malformed=malformed, disconnect_rule=rule,
                                max_calls_per_client=6, **pool)
    now = 1.0
    for _ in range(data.draw(st.integers(1, 20))):
        if data.draw(st.integers(0, 9)) == 0:
            now += data.draw(st.sampled_from([1.0, 61.0, 301.0]))
            tr.handle_timer(now)
        packet, d = data.draw(step(tr, convs))
        v = tr.handle_packet(packet, d, now)
        event(f"{v.action.value} {v.reason} {'rewritten' if v.data else ''}")
        check_verdict(v, packet)
        # several new calls in one segment may leave no ID for the high-byte rule: the
        # table then relaxes it (and counts that) rather than let a private Call ID out
        assert_table_consistent(tr.table, one_to_one=tr.table.relaxed == 0)
    deadline = tr.next_deadline()
    assert deadline is None or deadline >= 0


# -- malformed: drop or pass ----------------------------------------------------------------------


@settings(max_examples=200 * SCALE, deadline=None)
@given(payload=st.one_of(st.binary(min_size=12, max_size=60),
                         mutated(messages).filter(lambda b: len(b) >= 12)))
def test_malformed_policy_drop_and_pass(payload: bytes) -> None:
    try:
        parse_control_header(payload)
    except ProtocolError as exc:
        reason = exc.reason
    else:
        return  # a valid header: framing goes on, not this test's business
    verdicts = {}
    for action in MalformedAction:
        tr = make_translator(malformed=action)
        conv = Conversation(tr, "10.0.0.5")
        conv.open()
        v = conv.send(OUT, payload)
        verdicts[action] = (v.action, v.data, v.reason)
        assert v.events == (ProtocolViolation(reason, v.events[0].detail),)  # type: ignore[union-attr]
        assert tr.stats.verdicts[(v.action.value, reason)] == 1
    assert verdicts == {
        MalformedAction.DROP: (Action.DROP, None, reason),
        MalformedAction.PASS: (Action.ACCEPT, None, reason),
    }


def test_message_sizes_fit_the_framing_bound() -> None:
    # the stream never holds more than one message: the longest is 220 bytes
    assert max(MESSAGE_LENGTH.values()) == 220
