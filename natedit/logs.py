"""natedit's log and its event lines: one room for how natedit speaks to an operator.

:func:`setup` points the ``natedit`` logger at stderr in the policy's format
(``logging.format``: text or JSON lines); the CLI calls it at start and on
each reload. :func:`format_event` (logfmt, the text log's line and
``natedit events``'s) and :func:`event_fields` (JSON values: the JSON log's
keys and ``natedit events --json``) turn one core event into words.
:func:`call_id` is how every text output prints a Call ID: ``0x1234``
(:func:`call_id_both` adds the decimal a capture shows: ``0x1234 (4660)``);
JSON keeps the integer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from . import CallInfo, Event, LogFormat

CALL_ID_FIELDS = frozenset({"client_call_id", "server_call_id", "public_call_id"})
"""Event fields that hold a Call ID (printed by :func:`call_id` in text)."""


def call_id(value: int | None) -> str:
    """A Call ID as text everywhere prints it: ``0x1234``; ``-`` when not known yet."""
    return "-" if value is None else f"{value:#06x}"


def call_id_both(value: int) -> str:
    """A Call ID with its decimal, as captures (tshark, Wireshark) show it: ``0x1234 (4660)``."""
    return f"{value:#06x} ({value})"


class TextFormatter(logging.Formatter):
    """``natedit: message``; ``natedit: warning: message`` from WARNING up."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"natedit: {record.levelname.lower()}: {text}"
        return f"natedit: {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"time": ..., "level": "info", "message": ...}``.

    A record logged with ``extra={"fields": {...}}`` (a call event, a policy
    reload) carries those keys too: ``"event": "call_mapped", "client_address": ...``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": timestamp(record.created),
                                 "level": record.levelname.lower(),
                                 "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update((k, v) for k, v in fields.items() if k not in entry)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def timestamp(when: float) -> str:
    """UTC, to the millisecond: ``2026-11-21T01:38:02.114Z``."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    return f"{stamp}.{int(when * 1000) % 1000:03d}Z"


def setup(level: str, fmt: LogFormat = LogFormat.TEXT) -> None:
    """The ``natedit`` logger to stderr, at ``level``, in ``fmt``; again on each reload."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(message)s"))
    logger = logging.getLogger("natedit")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def format_event(event: Event) -> str:
    """One logfmt line: ``event=call_mapped client_address=10.0.0.2 ...``."""
    return format_fields(event_fields(event))


def format_fields(fields: dict[str, Any]) -> str:
    """Event fields (:func:`event_fields`) as logfmt, Call IDs in hex."""
    return " ".join(f"{key}={call_id(value) if key in CALL_ID_FIELDS else logfmt(value)}"
                    for key, value in fields.items())


def event_fields(event: Event) -> dict[str, Any]:
    """``{"event": "call_mapped", "client_address": "10.0.0.2", ...}``: JSON values.

    A call's fields are spelled out flat, as :class:`CallInfo` names them;
    addresses are strings, a Call ID not known yet is None.
    """
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()
    fields: dict[str, Any] = {"event": name}
    for field in dataclasses.fields(event):
        value = getattr(event, field.name)
        if isinstance(value, CallInfo):
            fields.update(dataclasses.asdict(value))
        else:
            fields[field.name] = value
    return {k: str(v) if isinstance(v, IPv4Address) else v for k, v in fields.items()}


def logfmt(value: object) -> str:
    """One logfmt value: quoted when it needs to be, ``-`` for None."""
    text = "-" if value is None else str(value)
    if not text or any(c in text for c in ' "=\\'):
        return json.dumps(text)
    return text


class Throttle:
    """At most one log line per key per ``interval`` seconds."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def allow(self, key: str) -> int | None:
        """None: stay quiet; else log now, and this many lines were held back."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] += 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def held_back(n: int) -> str:
    """What a throttled line adds: `` (3 more suppressed)``."""
    return f" ({n} more suppressed)" if n else ""
