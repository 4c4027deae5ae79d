"""natedit.worker without the kernel: verdicts applied, errors contained, timers, log lines."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from natedit import cli
from natedit.core.errors import DropReason, Malformed, Refusal, ReleaseReason
from natedit.core.events import (
    ACCEPT,
    Action,
    CallInfo,
    CallMapped,
    CallRefused,
    CallReleased,
    Event,
    ProtocolViolation,
    Verdict,
)
from natedit.core.wire import Direction
from natedit.logs import Throttle, format_event
from natedit.worker import TIMER_ERROR_BACKOFF, Dispatcher
from tests.harness.queued import FakePacket, give

CALL = CallInfo(
    client_address=IPv4Address("10.0.0.2"),
    client_call_id=4660,
    server_address=IPv4Address("198.51.100.2"),
    server_call_id=None,
    public_address=IPv4Address("198.51.100.1"),
    public_call_id=51234,
    state="requested",
)


class StandIn:
    """A translator whose answers the test sets."""

    def __init__(self) -> None:
        self.verdicts: dict[bytes, Verdict | Exception] = {}
        self.seen: list[tuple[bytes, Direction, float]] = []
        self.deadline: float | None = None
        self.timer_events: list[Event] | Exception = []
        self.timer_calls: list[float] = []

    def handle_packet(self, data: bytes, direction: Direction, now: float) -> Verdict:
        self.seen.append((data, direction, now))
        answer = self.verdicts.get(data, ACCEPT)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def next_deadline(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> list[Event]:
        self.timer_calls.append(now)
        if isinstance(self.timer_events, Exception):
            raise self.timer_events
        self.deadline = None
        return self.timer_events


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def standin() -> StandIn:
    return StandIn()


@pytest.fixture
def dispatcher(standin: StandIn, clock: Clock) -> Dispatcher:
    return Dispatcher(standin, clock=clock)


def test_accept_unchanged(dispatcher: Dispatcher, standin: StandIn) -> None:
    packet = FakePacket(b"same")
    give(dispatcher.packets, packet, Direction.INBOUND)
    assert packet.calls == ["get_payload", "accept"]
    assert standin.seen == [(b"same", Direction.INBOUND, 100.0)]


def test_accept_with_new_bytes(dispatcher: Dispatcher, standin: StandIn) -> None:
    standin.verdicts[b"old"] = Verdict(Action.ACCEPT, b"new")
    packet = FakePacket(b"old")
    give(dispatcher.packets, packet, Direction.OUTBOUND)
    assert packet.calls == ["get_payload", "set_payload", "accept"]
    assert packet.given == b"new"


def test_drop(dispatcher: Dispatcher, standin: StandIn) -> None:
    standin.verdicts[b"bad"] = Verdict(Action.DROP, reason=DropReason.NO_CALL)
    packet = FakePacket(b"bad")
    give(dispatcher.packets, packet, Direction.INBOUND)
    assert packet.calls == ["get_payload", "drop"]


def test_an_exception_drops_that_packet_only(
    dispatcher: Dispatcher, standin: StandIn, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    standin.verdicts[b"boom"] = ValueError("bug")
    for _ in range(3):
        packet = FakePacket(b"boom")
        give(dispatcher.packets, packet, Direction.OUTBOUND)
        assert packet.calls == ["get_payload", "drop"]
    good = FakePacket(b"fine")
    give(dispatcher.packets, good, Direction.OUTBOUND)
    assert good.calls == ["get_payload", "accept"]
    assert dispatcher.counts["packet_error"] == 3
    # One log line (with the traceback) per interval, then a count of what was held back.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["packet_error: outbound packet dropped"]
    assert errors[0].exc_info is not None
    clock.now += 5
    give(dispatcher.packets, FakePacket(b"boom"), Direction.OUTBOUND)
    assert caplog.records[-1].getMessage() == (
        "packet_error: outbound packet dropped (2 more suppressed)"
    )


def test_an_exception_after_the_verdict_does_not_give_a_second_one(
    dispatcher: Dispatcher, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.verdicts[b"x"] = Verdict(Action.ACCEPT, events=(CallMapped(CALL),))

    def broken(events: object) -> None:
        raise RuntimeError("log failed")

    monkeypatch.setattr(dispatcher, "log_events", broken)
    packet = FakePacket(b"x")
    give(dispatcher.packets, packet, Direction.OUTBOUND)
    assert packet.calls == ["get_payload", "accept"]
    assert dispatcher.counts["packet_error"] == 1


def test_events_are_logged_one_line_each(
    dispatcher: Dispatcher, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="natedit")
    standin.verdicts[b"x"] = Verdict(
        Action.ACCEPT, b"y", events=(CallMapped(CALL), CallReleased(CALL, ReleaseReason.DISCONNECT))
    )
    give(dispatcher.packets, FakePacket(b"x"), Direction.OUTBOUND)
    assert [r.getMessage() for r in caplog.records] == [
        format_event(CallMapped(CALL)),
        format_event(CallReleased(CALL, ReleaseReason.DISCONNECT)),
    ]


def test_protocol_violations_are_throttled_per_reason(
    dispatcher: Dispatcher, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    v = Verdict(Action.DROP, reason=Malformed.BAD_COOKIE,
                events=(ProtocolViolation(Malformed.BAD_COOKIE, "x"),))
    standin.verdicts[b"v"] = v
    for _ in range(5):
        give(dispatcher.packets, FakePacket(b"v"), Direction.INBOUND)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_format_event() -> None:
    assert format_event(CallMapped(CALL)) == (
        "event=call_mapped client_address=10.0.0.2 client_call_id=0x1234 "
        "server_address=198.51.100.2 server_call_id=- public_address=198.51.100.1 "
        "public_call_id=0xc822 state=requested"
    )
    assert format_event(CallReleased(CALL, ReleaseReason.IDLE)).endswith(
        " state=requested reason=idle")
    refused = CallRefused(IPv4Address("10.0.0.2"), None, IPv4Address("198.51.100.2"),
                          Refusal.TABLE_FULL)
    assert format_event(refused) == (
        "event=call_refused client_address=10.0.0.2 client_call_id=- "
        "server_address=198.51.100.2 reason=table_full"
    )
    violation = ProtocolViolation(Malformed.BAD_LENGTH, 'Length 3 < 12 "header"')
    assert format_event(violation) == (
        'event=protocol_violation reason=bad_length detail="Length 3 < 12 \\"header\\""'
    )


def test_timers_run_when_due(dispatcher: Dispatcher, standin: StandIn, clock: Clock) -> None:
    assert dispatcher.run_timers() is None
    standin.deadline = 150.0
    assert dispatcher.run_timers() == 150.0
    assert standin.timer_calls == []
    clock.now = 150.0
    standin.timer_events = [CallReleased(CALL, ReleaseReason.IDLE)]
    assert dispatcher.run_timers() is None
    assert standin.timer_calls == [150.0]


def test_a_failing_timer_backs_off(dispatcher: Dispatcher, standin: StandIn, clock: Clock) -> None:
    standin.deadline = 90.0
    standin.timer_events = RuntimeError("bug")
    assert dispatcher.run_timers() == clock.now + TIMER_ERROR_BACKOFF
    assert dispatcher.counts["timer_error"] == 1


def test_throttle(clock: Clock) -> None:
    throttle = Throttle(1.0, clock)
    assert throttle.allow("a") == 0
    assert throttle.allow("a") is None
    assert throttle.allow("b") == 0
    clock.now += 1.0
    assert throttle.allow("a") == 1


# -- the command line ------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("queue_inbound: 1723\nbogus: 1\n")
    assert cli.main(["rules", "--policy", str(policy), "--public-address", "198.51.100.1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("natedit: error: ")
    assert "bogus: unknown key" in err


def test_cli_rules_prints_the_iptables_flavour(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rules", "--public-address", "198.51.100.1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# natedit rules: iptables-restore --noflush < this\n")
    assert "-A NATEDIT-FORWARD-OUT -s 10.0.0.0/8 -j NFQUEUE --queue-num 1723" in out
