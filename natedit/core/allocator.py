"""The public Call ID allocator: one pool per (public address, server address).

A call's public Call ID must be unique per (public address, server): the
server tells the clients behind the gateway apart by it alone. The
allocator keeps, per pool, the IDs in use (``used``) and how many of them
each *block* of 256 IDs (one public high byte) holds (``blocks``); the table
enters and frees them as calls come and go (:meth:`Allocator.take`,
:meth:`Allocator.free`). It hands out free IDs at random (default: a live ID
is hard to guess) or in sequence, within the policy's range and the node's
share of it (``Policy.owns_call_id``).

The high-byte rule (see :mod:`natedit.core.table`): within one control
connection, two calls share a client Call ID high byte exactly when they
share a public one, so that the first byte of a Call ID field cut between two
segments is enough to rewrite it. The rule is kept whenever a free ID keeps
it, and relaxed (``relaxed`` counts it) when none does: a call is refused
(``pool_exhausted``) only when its pool has no free ID at all. A connection
whose calls share one client high byte (client Call IDs 1, 2, 3, ...) needs
them all in one public block, so with random allocation other connections' new
calls go to blocks no fuller than the pool's average (:meth:`Allocator.pick`):
a block one connection fills is left to it until the whole pool is about as
full. (Sequential allocation stays in order: the next free ID in a block the
connection does not use.)

What relaxing costs (:mod:`natedit.core.fields`): a Call ID field of that
connection cut between two segments may have a first byte that decides
nothing; it then leaves as it came, and the rest is dropped
(``split_call_id``) when a private Call ID of a live call would leave.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from .policy import Allocation, Policy

if TYPE_CHECKING:
    from .table import ControlConnection

Pool = tuple[bytes, bytes]
"""(public address, server address), packed."""
RANDOM_TRIES = 32
"""Random draws before a scan of the range (random allocation)."""


def _any(hi: int) -> bool:
    return True


class Allocator:
    def __init__(self, policy: Policy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.used: dict[Pool, set[int]] = {}
        """Public Call IDs in use per (public address, server address)."""
        self.blocks: dict[Pool, Counter[int]] = {}
        """Per pool: live public Call IDs by high byte (a block of 256), blocks in use only."""
        self._cursor: dict[Pool, int] = {}
        self.relaxed = 0
        """Calls mapped without the high-byte rule (see :meth:`pick`)."""

    # -- the table's side: what is in use ---------------------------------------------

    def take(self, pool: Pool, cid: int) -> None:
        used = self.used.setdefault(pool, set())
        if cid not in used:
            used.add(cid)
            self.blocks.setdefault(pool, Counter())[cid >> 8] += 1

    def free(self, pool: Pool, cid: int) -> None:
        used = self.used.get(pool)
        if used is not None and cid in used:
            used.discard(cid)
            blocks = self.blocks[pool]
            blocks[cid >> 8] -= 1
            if not blocks[cid >> 8]:
                del blocks[cid >> 8]

    def blocks_in_use(self) -> list[tuple[bytes, bytes, int, int]]:
        """(public address, server, blocks of 256 public Call IDs holding a live call,
        live calls in the fullest block) per pool that has been used."""
        return [(public, server, len(b), max(b.values(), default=0))
                for (public, server), b in list(self.blocks.items())]

    # -- new calls ------------------------------------------------------------------------

    def has_room(self, conn: ControlConnection, public_ip: bytes, client_his: list[int]) -> bool:
        """Whether new calls of ``conn`` (their client Call ID high bytes) all find a
        free public Call ID: whether the pool has that many free IDs in the range and
        this node's share (the high-byte rule is relaxed rather than refuse one)."""
        p = self.policy
        n = len(client_his)
        used = self.used.get((public_ip, conn.server_ip), set())
        size = p.share_size(p.call_id_first, p.call_id_last)
        if len(used) + n <= size:
            return True
        first, last, mine = p.call_id_first, p.call_id_last, p.owns_call_id
        if conn.client_ip == public_ip:  # the gateway's own: outside the range too
            outside = p.share_size(1, 0xFFFF) - size
            if sum(not first <= cid <= last and mine(cid) for cid in used) + n <= outside:
                return True
        # (live IDs outside a range changed by a reload, or not this node's, are not in it)
        return sum(first <= cid <= last and mine(cid) for cid in used) + n <= size

    def pick(self, conn: ControlConnection, client_call_hi: int,
             public_ip: bytes) -> int | None:
        """A free public Call ID for a new call of ``conn`` (the table enters it).

        In order of preference: one that keeps the high-byte rule (module
        docstring), in a block no fuller than the pool's average when the call
        takes a new block (random allocation); then (``relaxed``) one in a block no call of ``conn``
        uses, so public high bytes still name one client high byte; then any free
        one. Returns None only when the pool is full.
        """
        pool = (public_ip, conn.server_ip)
        used = self.used.setdefault(pool, set())
        blocks = self.blocks.setdefault(pool, Counter())
        mine = self.policy.owns_call_id
        if conn.client_ip == public_ip:
            own = self._outside_range(used)
            if own is not None:
                return own
        want = conn.public_his_for_client_hi(client_call_hi)
        avoid = conn.uses_public_hi
        first, last = self.policy.call_id_first, self.policy.call_id_last
        n_blocks = (last >> 8) - (first >> 8) + 1
        in_use = len(used)

        def free(cid: int) -> bool:
            return cid not in used and mine(cid)

        def new_block(hi: int) -> bool:
            return not avoid(hi)

        def light_new_block(hi: int) -> bool:  # at most the average load
            return not avoid(hi) and blocks.get(hi, 0) * n_blocks <= in_use

        spread = self.policy.allocation is Allocation.RANDOM

        def pick(*block_oks: Callable[[int], bool]) -> int | None:
            for block_ok in block_oks:
                if block_ok is light_new_block and not spread:
                    continue
                cid = self._pick(pool, free, block_ok)
                if cid is not None:
                    return cid
            return None

        if want:  # the rule: the block this client high byte is paired with
            for hi in sorted(want):  # (several once relaxed: any of them)
                cid = None if blocks.get(hi, 0) >= 256 else self._in_block(hi, free)
                if cid is not None:
                    return cid
            cid = pick(light_new_block, new_block, _any)
        else:  # the rule: a block no call of conn uses
            cid = pick(light_new_block, new_block)
            if cid is not None:
                return cid
            cid = pick(_any)
        self.relaxed += cid is not None
        return cid

    def _outside_range(self, used: set[int]) -> int | None:
        """A free ID of this node's share outside the policy's range, scanned from a
        random start (None: the range is the whole Call ID space, or no such ID is free).

        For the gateway's own client (its calls' client address is their public one):
        the inside clients' calls get the range, so a policy that narrows it (a pair's
        ranges, a range kept clear of the gateway's own Call IDs) leaves it to them."""
        p = self.policy
        first, last, mine = p.call_id_first, p.call_id_last, p.owns_call_id
        n = 0xFFFF - (last - first + 1)
        if n <= 0:
            return None
        start = self.rng.randrange(n)
        for i in range(n):
            cid = 1 + (start + i) % n  # 1..first-1, then last+1..0xFFFF
            if cid >= first:
                cid += last - first + 1
            if cid not in used and mine(cid):
                return cid
        return None

    def _in_block(self, hi: int, ok: Callable[[int], bool]) -> int | None:
        """A free ID of block ``hi`` in the range, scanned from a random start."""
        lo, top = max(self.policy.call_id_first, hi << 8), min(self.policy.call_id_last,
                                                               hi << 8 | 0xFF)
        if lo > top:
            return None
        n = top - lo + 1
        start = self.rng.randrange(n)
        for i in range(n):
            cid = lo + (start + i) % n
            if ok(cid):
                return cid
        return None

    def _pick(self, pool: Pool, ok: Callable[[int], bool],
              block_ok: Callable[[int], bool]) -> int | None:
        """An ID of the range that is ``ok`` in a block that is ``block_ok``: random
        draws, then a scan (random: from a random start; sequential: from the cursor)."""
        first, last = self.policy.call_id_first, self.policy.call_id_last
        size = last - first + 1
        blocks: Counter[int] = self.blocks.get(pool, Counter())
        if self.policy.allocation is Allocation.RANDOM:
            for _ in range(RANDOM_TRIES):
                cid = first + self.rng.randrange(size)
                if block_ok(cid >> 8) and ok(cid):
                    return cid
            start = self.rng.randrange(size)
        else:
            start = self._cursor.get(pool, 0)
        i = 0
        while i < size:
            cid = first + (start + i) % size
            hi = cid >> 8
            if blocks.get(hi, 0) >= 256 or not block_ok(hi):  # on to the next block
                i += min((cid | 0xFF) + 1, last + 1) - cid  # (or to the range's start)
                continue
            if ok(cid):
                self._cursor[pool] = (cid - first + 1) % size
                return cid
            i += 1
        return None
