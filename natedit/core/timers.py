"""The timers of calls and control connections: one lazy heap, no clock.

An entry ``(when, seq, obj)`` is a lower bound of the object's expiry: traffic
moves an object's expiry later without touching the heap, and when an entry
comes due the object is asked again (``obj.expires(policy)``) and re-armed if
it is not due after all. Entries of released objects are skipped. So that they
cannot pile up under churn, the heap is rebuilt once it holds more than
:data:`TIMER_SLACK` entries per live object, plus :data:`TIMER_FLOOR`: memory
stays proportional to what is live, at an amortised constant cost per entry.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from .policy import Policy

TIMER_SLACK = 2
TIMER_FLOOR = 256


class Timed(Protocol):
    @property
    def released(self) -> bool: ...

    def expires(self, policy: Policy) -> float: ...


class Timers:
    __slots__ = ("_count", "_heap", "_limit", "_live", "_seq", "policy")

    def __init__(self, policy: Policy, live: Callable[[], Iterable[Timed]],
                 count: Callable[[], int]) -> None:
        self.policy = policy
        self._live = live
        """Every live object, for a rebuild."""
        self._count = count
        """How many objects are live."""
        self._heap: list[tuple[float, int, Timed]] = []
        self._seq = 0
        self._limit = TIMER_FLOOR
        """The heap's size at which the live objects are counted again."""

    def __len__(self) -> int:
        """Entries in the heap (stale ones included)."""
        return len(self._heap)

    def schedule(self, obj: Timed, when: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, obj))
        if len(self._heap) > self._limit:
            self._limit = TIMER_SLACK * self._count() + TIMER_FLOOR
            if len(self._heap) > self._limit:
                self.rebuild()

    def rebuild(self) -> None:
        """One entry per live object, from the policy in force (its timeouts changed)."""
        self._heap = []
        self._limit = TIMER_SLACK * self._count() + TIMER_FLOOR
        for obj in self._live():
            self.schedule(obj, obj.expires(self.policy))

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].released:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expired(self, now: float) -> Iterator[Timed]:
        """Yield each object whose expiry has passed; re-arm the others."""
        while self._heap and self._heap[0][0] <= now:  # (schedule may rebuild the heap)
            _, _, obj = heapq.heappop(self._heap)
            if obj.released:
                continue
            due = obj.expires(self.policy)
            if due <= now:
                yield obj
            else:
                self.schedule(obj, due)
