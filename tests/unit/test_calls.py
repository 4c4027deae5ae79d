"""natedit.core.calls: the call lifecycle as a table, and the translator going through it.

The table itself (every step names a call message, every state has a timer), the
table being the only way a state changes (no setter), a message with no step
counted as ``unexpected_message`` and changing nothing, each message's call found
once, and the steps that are not the plain request/reply/clear/disconnect path.
"""

from __future__ import annotations

import pytest

from natedit import CallEstablished, CallReleased, MessageType
from natedit.core import control as control_module
from natedit.core.calls import TIMEOUTS, TRANSITIONS, CallState, Outcome, Step
from natedit.core.errors import PassReason, ReleaseReason
from natedit.core.table import CallTable, ControlConnection
from natedit.core.translator import Translator
from natedit.core.wire import CALL_ID_FIELDS, OWN_CALL_ID_OFFSET, Direction
from tests.pptp_flows import (
    IN,
    OUT,
    Conversation,
    establish,
    forward,
    make_translator,
    msg,
    payload_of,
    run_timers,
    u16,
)

MT = MessageType
UNEXPECTED = ("accept", PassReason.UNEXPECTED_MESSAGE)


def opened() -> tuple[Conversation, Translator]:
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    return conv, tr


# -- the table ------------------------------------------------------------------------------


def test_every_state_has_a_timer_and_a_way_out() -> None:
    assert set(TIMEOUTS) == set(CallState)
    assert TIMEOUTS[CallState.ESTABLISHED].idle
    assert {t.release for t in TIMEOUTS.values()} == {
        ReleaseReason.REQUEST_TIMEOUT, ReleaseReason.IDLE, ReleaseReason.CLEAR_TIMEOUT}
    for state in CallState:
        for d in Direction:
            assert TRANSITIONS[(state, d, MT.CALL_DISCONNECT_NOTIFY, Outcome.ANY)] == Step(
                None, ReleaseReason.DISCONNECT)
            assert TRANSITIONS[(state, d, MT.STOP_CONTROL_CONNECTION_REQUEST,
                                Outcome.ANY)].release is ReleaseReason.STOP


def test_steps_are_well_formed() -> None:
    call_messages = {mt for (_, mt) in CALL_ID_FIELDS} | {
        MT.STOP_CONTROL_CONNECTION_REQUEST, MT.STOP_CONTROL_CONNECTION_REPLY}
    for (state, d, mt, outcome), step in TRANSITIONS.items():
        assert mt in call_messages, mt
        assert (step.state is None) == (step.release is not None)
        has_result = mt in (MT.OUTGOING_CALL_REPLY, MT.INCOMING_CALL_REPLY)
        assert (outcome is not Outcome.ANY) == has_result or mt in (
            MT.OUTGOING_CALL_REQUEST, MT.INCOMING_CALL_REQUEST), (state, d, mt, outcome)
        if step.again:
            assert step.state is state


def test_no_setter_of_state() -> None:
    assert not hasattr(CallTable, "set_state")


# -- the translator through the table -------------------------------------------------------


def test_a_message_with_no_step_is_counted_and_changes_nothing() -> None:
    conv, tr = opened()
    public = establish(conv, 0x1234, 0x80)
    (call,) = tr.table.calls()
    since = call.since
    # Incoming-Call-Connected for an established call: no step
    conv.now = 3.0
    v = conv.send(IN, msg(MT.INCOMING_CALL_CONNECTED, peer_call_id=public))
    assert v.accepted
    assert not any(isinstance(e, CallEstablished | CallReleased) for e in v.events)
    assert tr.stats.verdicts[UNEXPECTED] == 1
    assert call.state is CallState.ESTABLISHED and call.since == since
    # its Call ID is still rewritten (public -> private)
    assert u16(payload_of(v.data or b""), 12) == 0x1234


def test_incoming_call_connected_before_any_reply_is_unexpected() -> None:
    conv, tr = opened()
    forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    (call,) = tr.table.calls()
    conv.send(IN, msg(MT.INCOMING_CALL_CONNECTED, peer_call_id=call.public_call_id))
    assert call.state is CallState.REQUESTED
    assert tr.stats.verdicts[UNEXPECTED] == 1


def test_a_second_reply_tells_the_established_call_again() -> None:
    conv, tr = opened()
    public = establish(conv, 0x1234, 0x80)
    v = conv.send(IN, msg(MT.OUTGOING_CALL_REPLY, call_id=0x99, peer_call_id=public))
    assert [type(e) for e in v.events] == [CallEstablished]
    (call,) = tr.table.calls()
    assert call.server_call_id == 0x99 and tr.stats.verdicts[UNEXPECTED] == 0


def test_a_reply_crossing_a_clear_request_leaves_the_call_closing() -> None:
    """The client clears a call it asked for; the server's reply was already on its
    way: the call stays CLOSING, learns the server's Call ID, and the server's
    Call-Disconnect-Notify (with that Call ID) ends it."""
    conv, tr = opened()
    forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    (call,) = tr.table.calls()
    forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    assert call.state is CallState.CLOSING
    v = conv.send(IN, msg(MT.OUTGOING_CALL_REPLY, call_id=0x80,
                          peer_call_id=call.public_call_id))
    assert not v.events and call.state is CallState.CLOSING and call.server_call_id == 0x80
    v = conv.send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x80))
    assert [(e.call.client_call_id, e.reason) for e in v.events
            if isinstance(e, CallReleased)] == [(0x1234, ReleaseReason.DISCONNECT)]


def test_a_second_clear_request_does_not_extend_the_clear_timer() -> None:
    conv, tr = opened()
    establish(conv, 0x1234, 0x80)
    forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    conv.now = 50.0
    forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    events = run_timers(tr, 60.0)  # request_timeout (60 s) after the first
    assert [(e.call.client_call_id, e.reason) for e in events
            if isinstance(e, CallReleased)] == [(0x1234, ReleaseReason.CLEAR_TIMEOUT)]


def test_the_server_clears_a_call_of_a_client_that_is_a_pac() -> None:
    """An inbound Call-Clear-Request names the call by the server's Call ID (read, not
    rewritten): the call goes CLOSING."""
    conv, tr = opened()
    establish(conv, 0x1234, 0x80)
    v = conv.send(IN, msg(MT.CALL_CLEAR_REQUEST, call_id=0x80))
    assert v.data is None  # nothing to rewrite
    (call,) = tr.table.calls()
    assert call.state is CallState.CLOSING


@pytest.mark.parametrize("cut", [None, 13, 14, 15, 20])
def test_an_outgoing_call_reply_finds_its_call_once(monkeypatch: pytest.MonkeyPatch,
                                                    cut: int | None) -> None:
    """However the reply is cut into segments, its call is looked up once, and the
    Call ID field table is read once per piece."""
    conv, tr = opened()
    forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    (call,) = tr.table.calls()
    lookups: list[int] = []
    original = ControlConnection.call_by_public_id

    def counting(self: ControlConnection, call_id: int) -> object:
        lookups.append(call_id)
        return original(self, call_id)

    monkeypatch.setattr(ControlConnection, "call_by_public_id", counting)
    reads: list[object] = []

    class CountingFields(dict):  # type: ignore[type-arg]
        def get(self, key: object, default: object = None) -> object:
            reads.append(key)
            return super().get(key, default)

    monkeypatch.setattr(control_module, "CALL_ID_FIELDS", CountingFields(CALL_ID_FIELDS))
    reply = msg(MT.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=call.public_call_id)
    parts = [reply] if cut is None else [reply[:cut], reply[cut:]]
    for part in parts:
        conv.send(IN, part)
    assert lookups == [call.public_call_id]
    assert len(reads) == len(parts)
    assert call.state is CallState.ESTABLISHED and call.server_call_id == 0x80


def test_field_offsets_come_from_the_wire_tables() -> None:
    for (d, mt), field in CALL_ID_FIELDS.items():
        if d is OUT or mt in (MT.CALL_DISCONNECT_NOTIFY, MT.CALL_CLEAR_REQUEST):
            assert field.offset == OWN_CALL_ID_OFFSET[mt]
        if field.server_call_id_at is not None:
            assert mt in (MT.OUTGOING_CALL_REPLY, MT.INCOMING_CALL_REPLY)
    assert IN is Direction.INBOUND
