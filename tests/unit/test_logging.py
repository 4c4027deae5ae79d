"""The operator's log: one structured line per call event and per policy reload.

Every kind of event the worker logs (call mapped, established, released,
refused; control connection refused; protocol violation) and both reload
outcomes give exactly one line, in the text format (``natedit: event=...``
logfmt; a reload's sentence) and in the JSON format (one object with the
event's fields as keys), at the level the policy sets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from natedit import logs, reload
from natedit.core.errors import Malformed, Refusal, ReleaseReason
from natedit.core.events import (
    CallEstablished,
    CallInfo,
    CallMapped,
    CallRefused,
    CallReleased,
    ConnectionRefused,
    Event,
    ProtocolViolation,
)
from natedit.core.policy import LogFormat, Policy
from natedit.policyfile import read_policy
from natedit.status import PolicyStatus
from natedit.worker import Dispatcher

CLIENT, SERVER, PUBLIC = "10.0.0.2", "198.51.100.2", "198.51.100.1"
CALL = CallInfo(IPv4Address(CLIENT), 0x1234, IPv4Address(SERVER), 128, IPv4Address(PUBLIC),
                40001, "established")
EVENTS: dict[str, Event] = {
    "call_mapped": CallMapped(CALL),
    "call_established": CallEstablished(CALL),
    "call_released": CallReleased(CALL, ReleaseReason.DISCONNECT),
    "call_refused": CallRefused(IPv4Address(CLIENT), 0x1234, IPv4Address(SERVER),
                                Refusal.CLIENT_LIMIT),
    "connection_refused": ConnectionRefused(IPv4Address(CLIENT), IPv4Address(SERVER),
                                            Refusal.CLIENT_DENIED),
    "protocol_violation": ProtocolViolation(Malformed.BAD_COOKIE, "cookie 0xdeadbeef"),
}
LEVELS = {"protocol_violation": "warning"}
"""Every other event is info."""


class _NoTranslator:
    def handle_packet(self, data: bytes, direction: object, now: float) -> object:
        raise AssertionError("not used")

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> list[Event]:
        return []


@contextlib.contextmanager
def logging_as(fmt: LogFormat, level: str = "info") -> Iterator[None]:
    """The worker's logging set up as the policy says (on the current sys.stderr)."""
    logs.setup(level, fmt)
    try:
        yield
    finally:
        logs.setup("info")


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    out, err = capsys.readouterr()
    assert out == ""
    return err.splitlines()


@pytest.mark.parametrize("log_format", list(LogFormat), ids=lambda f: f.value)
@pytest.mark.parametrize("name", list(EVENTS))
def test_each_call_event_is_one_structured_line(
        name: str, log_format: LogFormat, capsys: pytest.CaptureFixture[str]) -> None:
    with logging_as(log_format):
        Dispatcher(_NoTranslator()).log_events([EVENTS[name]])  # type: ignore[arg-type]
    (line,) = lines(capsys)
    level = LEVELS.get(name, "info")
    if log_format is LogFormat.TEXT:
        prefix = "natedit: " if level == "info" else f"natedit: {level}: "
        assert line.startswith(f"{prefix}event={name} "), line
        fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line.removeprefix(prefix)))
    else:
        entry = json.loads(line)
        assert entry["level"] == level and entry["event"] == name, entry
        assert entry["message"].startswith(f"event={name} ")
        fields = {k: (logs.call_id(v) if k in logs.CALL_ID_FIELDS else str(v))
                  for k, v in entry.items()}  # JSON keeps the integer, text prints hex
    event = EVENTS[name]
    if hasattr(event, "call"):
        assert fields["client_address"] == CLIENT and fields["public_call_id"] == "0x9c41"
        assert fields["server_call_id"] == "0x0080" and fields["state"] == "established"
        assert fields["client_call_id"] == "0x1234"
    if hasattr(event, "reason"):
        assert fields["reason"] == event.reason


def test_json_event_values_keep_their_types(capsys: pytest.CaptureFixture[str]) -> None:
    refused = CallRefused(IPv4Address(CLIENT), None, IPv4Address(SERVER), Refusal.POOL_EXHAUSTED)
    with logging_as(LogFormat.JSON):
        Dispatcher(_NoTranslator()).log_events([refused])  # type: ignore[arg-type]
    (line,) = lines(capsys)
    entry = json.loads(line)
    assert {k: entry[k] for k in ("event", "client_address", "client_call_id",
                                  "server_address", "reason")} == {
        "event": "call_refused", "client_address": CLIENT, "client_call_id": None,
        "server_address": SERVER, "reason": "pool_exhausted"}


@pytest.mark.parametrize("log_format", list(LogFormat), ids=lambda f: f.value)
def test_each_reload_is_one_structured_line(
        log_format: LogFormat, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("limits:\n  max_calls: 100\n")
    applied: list[Policy] = []
    reloader = reload.Reloader(str(path), read_policy(str(path)).policy, applied.append,
                               PolicyStatus())
    with logging_as(log_format):
        path.write_text("limits:\n  max_calls: 50\n")
        assert reloader.reload()
        path.write_text("limits:\n  max_calls: lots\n")
        assert not reloader.reload()
    ok, rejected = lines(capsys)
    problem = f"{path}:2: limits.max_calls: expected an integer from 1 to 65535, found 'lots'"
    if log_format is LogFormat.TEXT:
        assert ok == f"natedit: policy reloaded from {path}: limits.max_calls 100 -> 50"
        assert rejected == ("natedit: error: policy reload rejected, the running policy "
                            f"stays: {problem}")
        return
    ok_entry, rejected_entry = json.loads(ok), json.loads(rejected)
    assert {k: ok_entry[k] for k in ("level", "event", "source", "changes")} == {
        "level": "info", "event": "policy_reloaded", "source": str(path),
        "changes": ["limits.max_calls 100 -> 50"]}
    assert {k: rejected_entry[k] for k in ("level", "event", "source", "problems")} == {
        "level": "error", "event": "policy_reload_rejected", "source": str(path),
        "problems": [problem]}


def test_levels_come_from_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    """logging.level: warning keeps call events (info) out, protocol violations in."""
    with logging_as(LogFormat.TEXT, "warning"):
        Dispatcher(_NoTranslator()).log_events(list(EVENTS.values()))  # type: ignore[arg-type]
    assert [ln.split()[2] for ln in lines(capsys)] == ["event=protocol_violation"]
    assert logging.getLogger("natedit").level == logging.INFO
