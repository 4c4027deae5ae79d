"""The public Call ID allocator: one pool per (public address, server address).

A call's public Call ID must be unique per (public address, server): the
server tells the clients behind the gateway apart by it alone. The
allocator keeps, per pool, the IDs in use (``used``; the table adds and frees
them as calls come and go) and hands out free ones, at random (default: a
live ID is hard to guess) or in sequence, within the policy's range and the
node's share of it (``Policy.owns_call_id``).

The high-byte rule (see :mod:`natedit.core.table`): within one control
connection, two calls share a client Call ID high byte exactly when they
share a public one, so that the first byte of a Call ID field cut between two
segments is enough to rewrite it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from .policy import Allocation, Policy

if TYPE_CHECKING:
    from .table import ControlConnection


class Allocator:
    def __init__(self, policy: Policy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.used: dict[tuple[bytes, bytes], set[int]] = {}
        """Public Call IDs in use per (public address, server address)."""
        self._cursor: dict[tuple[bytes, bytes], int] = {}
        self.relaxed = 0
        """Calls mapped without the high-byte rule (see :meth:`pick`)."""

    def has_room(self, conn: ControlConnection, public_ip: bytes, client_his: list[int]) -> bool:
        """Whether new calls of ``conn`` (their client Call ID high bytes) all find a
        free public Call ID."""
        p = self.policy
        n = len(client_his)
        used = self.used.get((public_ip, conn.server_ip), set())
        size = p.share_size(p.call_id_first, p.call_id_last)
        if not conn.calls and n == 1:  # the common case: any free ID of the share will do
            return len(used) < size or self._room_for(conn, client_his[0], used)
        if len(used) + n > size and sum(p.call_id_first <= cid <= p.call_id_last
                                        and p.owns_call_id(cid) for cid in used) + n > size:
            return False  # (live IDs outside a range changed by a reload are free)
        return all(self._room_for(conn, hi, used) for hi in client_his)

    def _room_for(self, conn: ControlConnection, client_hi: int, used: set[int]) -> bool:
        """Whether a free public ID keeps the high bytes of ``conn`` one-to-one."""
        p = self.policy
        first, last, mine = p.call_id_first, p.call_id_last, p.owns_call_id
        want_hi = conn.public_hi_for_client_hi(client_hi)
        if want_hi is not None:
            lo, hi = max(first, want_hi << 8), min(last, want_hi << 8 | 0xFF)
            return any(cid not in used and mine(cid) for cid in range(lo, hi + 1))
        avoid = {c.public_call_id >> 8 for c in conn.calls}
        if p.share_size(first, last) - len(used) > 256 * len(avoid):
            return True  # more free IDs than the avoided blocks can hold
        return any(cid not in used and cid >> 8 not in avoid and mine(cid)
                   for cid in range(first, last + 1))

    def pick(self, conn: ControlConnection, client_call_hi: int,
             public_ip: bytes) -> int | None:
        """A free public Call ID for a new call of ``conn`` (the table enters it).

        Should several new calls in one segment together leave no ID that keeps
        the high-byte rule (module docstring), the rule is relaxed for the last
        one rather than let its private Call ID out (``relaxed`` counts it).
        Returns None only when the pool is full.
        """
        pool_key = (public_ip, conn.server_ip)
        used = self.used.setdefault(pool_key, set())
        want_hi = conn.public_hi_for_client_hi(client_call_hi)
        avoid_hi = {c.public_call_id >> 8 for c in conn.calls} if conn.calls else set()

        mine = self.policy.owns_call_id

        def ok(cid: int) -> bool:
            if cid in used or not mine(cid):
                return False
            hi = cid >> 8
            return hi == want_hi if want_hi is not None else hi not in avoid_hi

        cid = self._pick(pool_key, used, ok, want_hi)
        if cid is None:
            cid = self._pick(pool_key, used, lambda c: c not in used and mine(c), None)
            if cid is None:
                return None
            self.relaxed += 1
        return cid

    def _pick(self, pool_key: tuple[bytes, bytes], used: set[int], ok: Callable[[int], bool],
              want_hi: int | None) -> int | None:
        first, last = self.policy.call_id_first, self.policy.call_id_last
        if want_hi is not None:  # only 256 candidates: scan them from a random start
            lo, hi = max(first, want_hi << 8), min(last, (want_hi << 8) | 0xFF)
            candidates = list(range(lo, hi + 1)) if lo <= hi else []
            start = self.rng.randrange(len(candidates)) if candidates else 0
            for i in range(len(candidates)):
                cid = candidates[(start + i) % len(candidates)]
                if ok(cid):
                    return cid
            return None
        size = last - first + 1
        if self.policy.allocation is Allocation.RANDOM:
            for _ in range(32):
                cid = first + self.rng.randrange(size)
                if ok(cid):
                    return cid
            start = self.rng.randrange(size)
        else:
            start = self._cursor.get(pool_key, 0)
        for i in range(size):
            off = (start + i) % size
            if ok(first + off):
                self._cursor[pool_key] = (off + 1) % size
                return first + off
        return None
