"""What the core counts and what it has to tell: :class:`Stats` and :class:`Outbox`.

Every room of the core (the call table, the TCP 1723 path, GRE) counts into the
one :class:`Stats` of its translator and appends its events to the one
:class:`Outbox`; the translator hands the events out with the verdict of the
packet (or the timer run) that made them. The edges read ``Stats`` live
(:mod:`natedit.metrics`).
"""

from __future__ import annotations

from collections import Counter

from .errors import ProtocolError, Reason
from .events import ACCEPT, Action, Event, ProtocolViolation, Verdict
from .wire import CALL_ID_FIELDS


class Stats:
    """Counters of everything the translator decided; metrics read them live.

    The keys of the reason counters are reason enum members (:mod:`.errors`), read by
    their strings alike (``StrEnum``).
    """

    known_rewrites = tuple(sorted({(mt.name, f.kind.value)
                                   for (_, mt), f in CALL_ID_FIELDS.items() if f.rewritten}))
    """The (message type name, field kind) keys ``rewrites`` can have."""

    def __init__(self) -> None:
        self.verdicts: Counter[tuple[str, str]] = Counter()
        """(action, reason) of every drop and deliberate pass-through."""
        self.messages: Counter[tuple[str, str]] = Counter()
        """(direction, message type name) of every complete control message."""
        self.rewrites: Counter[tuple[str, str]] = Counter()
        """(message type name, field kind) of every Call ID field rewritten."""
        self.gre_packets = [0, 0]
        """Translated GRE packets by Direction."""
        self.gre_bytes = [0, 0]
        self.calls_mapped = 0
        self.calls_released: Counter[str] = Counter()
        self.calls_refused: Counter[str] = Counter()
        """Requests for new calls refused, by reason (not counting retransmissions)."""
        self.connections_refused: Counter[str] = Counter()
        """Client SYNs of control connections the ACL denied, by reason."""
        self.calls_restored = 0
        """Calls put back from a previous run's records (:meth:`Translator.restore`)."""


class Outbox:
    """The events made since the last verdict, and the verdicts that carry them."""

    __slots__ = ("events", "stats")

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.events: list[Event] = []

    def take(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def verdict(self, action: Action, reason: Reason | None, data: bytes | None = None,
                violation: ProtocolError | None = None) -> Verdict:
        """The verdict of one packet, counted by its reason, with the events so far."""
        if reason is not None:
            self.stats.verdicts[(action.value, reason)] += 1
        if violation is not None:
            self.events.append(ProtocolViolation(violation.reason, violation.detail))
        if not self.events:
            if data is None and reason is None:
                return ACCEPT
            return Verdict(action, data, reason)
        return Verdict(action, data, reason, tuple(self.take()))
