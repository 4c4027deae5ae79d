"""The call table: the single source of truth of what natedit has mapped.

Theory of operation
-------------------
A *control connection* is one TCP 1723 conversation, keyed by the inside
view of its addresses ``(client, client port, server, server port)``: the
queue sees the private client address both ways (see ``rules.py``).

A *call* maps one client Call ID, on one control connection, to a *public*
Call ID that is unique per ``(public address, server address)``: the server
sees every client behind the gateway as one host and tells their calls apart
by the public Call ID alone, and carries it back in every GRE packet. Two
clients may therefore pick the same Call ID, and one client may run several
calls on one control connection and several control connections: each call
gets its own public ID and its own row here.

Indexes, all kept by this module only:

* ``by_public[(public, server, public_call_id)]`` - inbound GRE and the
  uniqueness the allocator guarantees;
* ``by_server[(client, server, server_call_id)]`` - outbound GRE (it
  carries the server's Call ID) once the server has answered;
* ``ControlConnection.calls`` - the few calls of one control connection,
  for the control messages that name them.

Split fields. A Call ID field may be cut between two TCP segments, and the
first byte must be forwarded before the second is seen. So that one byte is
always enough to write the right high byte, the allocator keeps the map
between client and public *high bytes* one-to-one within each control
connection (:meth:`CallTable.allocate`): two calls of one connection share a
client high byte exactly when they share a public high byte.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

from .checksum import address_delta
from .errors import DropReason, Refusal, RestoreOutcome
from .events import CallInfo, CallRecord
from .policy import Allocation, Policy
from .stream import Stream

TIMER_SLACK = 2
TIMER_FLOOR = 256
"""The timer heap is rebuilt once it holds more than TIMER_SLACK entries per live
call and connection, plus TIMER_FLOOR: memory stays proportional to what is live,
at an amortised constant cost per schedule."""
CONNECTION_SLACK = 16
"""Control connections a client may hold beyond ``max_calls_per_client``: ones being
opened or closed, or not yet forgotten after their calls ended (the idle timeout)."""

ConnKey = tuple[bytes, int, bytes, int]
"""(client address, client port, server address, server port), addresses packed."""


class CallState(enum.Enum):
    REQUESTED = "requested"
    """Outgoing-Call-Request seen, waiting for the reply."""
    INCOMING = "incoming"
    """Incoming-Call-Reply seen, waiting for Incoming-Call-Connected."""
    ESTABLISHED = "established"
    CLOSING = "closing"
    """Call-Clear-Request seen, waiting for Call-Disconnect-Notify."""


class Call:
    """One mapping. Mutable, owned by the table; others get :class:`CallInfo`."""

    __slots__ = (
        "client_call_hi", "client_call_id", "client_ip", "conn", "gre_bytes", "gre_packets",
        "in_csum_delta", "last_seen", "out_csum_delta", "public_call_id", "public_ip",
        "released", "server_call_id", "server_ip", "since", "state",
    )

    def __init__(self, conn: ControlConnection, client_call_hi: int, public_ip: bytes,
                 public_call_id: int, now: float) -> None:
        self.conn = conn
        self.client_ip = conn.client_ip
        self.server_ip = conn.server_ip
        self.public_ip = public_ip
        self.client_call_hi = client_call_hi
        self.client_call_id: int | None = None
        self.public_call_id = public_call_id
        self.server_call_id: int | None = None
        self.state = CallState.REQUESTED
        self.since = now
        self.last_seen = now
        self.released = False
        self.gre_packets = [0, 0]
        """GRE packets by Direction (outbound, inbound)."""
        self.gre_bytes = [0, 0]
        # The IP header checksum deltas of the address rewrites are the same for
        # every GRE packet of the call: compute them once (RFC 1624).
        self.in_csum_delta = address_delta(public_ip, self.client_ip)
        self.out_csum_delta = address_delta(self.client_ip, public_ip)

    def info(self) -> CallInfo:
        return CallInfo(
            IPv4Address(self.client_ip), self.client_call_id, IPv4Address(self.server_ip),
            self.server_call_id, IPv4Address(self.public_ip), self.public_call_id,
            self.state.value,
        )

    def record(self) -> CallRecord:
        conn = self.conn
        return CallRecord(
            IPv4Address(self.client_ip), conn.client_port, IPv4Address(self.server_ip),
            conn.server_port, IPv4Address(self.public_ip), self.public_call_id,
            self.client_call_hi, self.client_call_id, self.server_call_id, self.state.value,
        )

    def expires(self, policy: Policy) -> float:
        if self.state is CallState.ESTABLISHED:
            return self.last_seen + policy.call_idle_timeout
        return self.since + policy.request_timeout


class ControlConnection:
    __slots__ = ("calls", "client_ip", "client_port", "fin", "key", "last_seen", "refused_at",
                 "released", "server_ip", "server_port", "started", "streams")

    def __init__(self, key: ConnKey, now: float, *, started: bool = True) -> None:
        self.key = key
        self.client_ip, self.client_port, self.server_ip, self.server_port = key
        self.calls: list[Call] = []
        self.streams = (Stream(), Stream())
        """Byte streams by Direction: client->server, server->client."""
        self.fin = [False, False]
        self.refused_at: list[int | None] = [None, None]
        """By Direction: sequence number of the last segment whose new calls were
        refused, so that its retransmissions are not counted again."""
        self.last_seen = now
        self.released = False
        self.started = started
        """Whether calls may be set up: a Start-Control-Connection-Request was seen
        (either way), or natedit did not see the connection start (picked up
        mid-stream, or restored after a restart), so it cannot know."""

    def expires(self, policy: Policy) -> float:
        return self.last_seen + policy.control_idle_timeout

    def call_by_client_id(self, call_id: int) -> Call | None:
        for call in self.calls:
            if call.client_call_id == call_id:
                return call
        return None

    def call_by_public_id(self, call_id: int) -> Call | None:
        for call in self.calls:
            if call.public_call_id == call_id:
                return call
        return None

    def call_by_server_id(self, call_id: int) -> Call | None:
        for call in self.calls:
            if call.server_call_id == call_id:
                return call
        return None

    def public_hi_for_client_hi(self, hi: int) -> int | None:
        for call in self.calls:
            if call.client_call_hi == hi:
                return call.public_call_id >> 8
        return None

    def client_hi_for_public_hi(self, hi: int) -> int | None:
        for call in self.calls:
            if call.public_call_id >> 8 == hi:
                return call.client_call_hi
        return None


class CallTable:
    """Calls and control connections, their indexes, the allocator and timers."""

    def __init__(self, policy: Policy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.connections: dict[ConnKey, ControlConnection] = {}
        self.by_public: dict[tuple[bytes, bytes, int], Call] = {}
        self.by_server: dict[tuple[bytes, bytes, int], Call] = {}
        self.per_client: Counter[bytes] = Counter()
        self.connections_per_client: Counter[bytes] = Counter()
        self.used: dict[tuple[bytes, bytes], set[int]] = {}
        """Public Call IDs in use per (public address, server address)."""
        self._cursor: dict[tuple[bytes, bytes], int] = {}
        self.relaxed = 0
        """Calls mapped without the high-byte rule (see :meth:`allocate`)."""
        self._timers: list[tuple[float, int, Call | ControlConnection]] = []
        self._timer_seq = 0

    # -- listing ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.by_public)

    def calls(self) -> Iterator[Call]:
        return iter(list(self.by_public.values()))

    # -- control connections -----------------------------------------------------------

    def connection(self, key: ConnKey, now: float, create: bool,
                   started: bool = True) -> ControlConnection | None:
        conn = self.connections.get(key)
        if conn is None and create:
            if self.connection_refusal(key[0]) is not None:
                return None
            conn = ControlConnection(key, now, started=started)
            self.connections[key] = conn
            self.connections_per_client[key[0]] += 1
            self.schedule(conn, conn.expires(self.policy))
        return conn

    def connection_refusal(self, client_ip: bytes) -> DropReason | None:
        """Why a new control connection of ``client_ip`` cannot be tracked, or None.

        Besides the table's limit, a client may hold as many connections as it may
        hold calls (``max_calls_per_client``), plus :data:`CONNECTION_SLACK`: a PPTP
        client needs at most one per call, and so one client opening connections
        cannot fill the table.
        """
        if len(self.connections) >= self.policy.max_control_connections:
            return DropReason.TOO_MANY_CONNECTIONS
        if (self.connections_per_client[client_ip]
                >= self.policy.max_calls_per_client + CONNECTION_SLACK):
            return DropReason.CLIENT_CONNECTION_LIMIT
        return None

    def forget_connection(self, conn: ControlConnection) -> None:
        """Drop a connection record; its calls must have been released first."""
        conn.released = True
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]
            self.connections_per_client[conn.client_ip] -= 1
            if not self.connections_per_client[conn.client_ip]:
                del self.connections_per_client[conn.client_ip]

    # -- calls ------------------------------------------------------------------------

    def refusal(self, conn: ControlConnection, public_ip: bytes,
                client_his: list[int]) -> Refusal | None:
        """Why new calls of ``conn`` (their client Call ID high bytes) cannot all be
        mapped, or None."""
        p = self.policy
        n = len(client_his)
        if self.per_client[conn.client_ip] + n > p.max_calls_per_client:
            return Refusal.CLIENT_LIMIT
        if len(self.by_public) + n > p.max_calls:
            return Refusal.TABLE_FULL
        used = self.used.get((public_ip, conn.server_ip), set())
        size = p.share_size(p.call_id_first, p.call_id_last)
        if len(used) + n > size and sum(p.call_id_first <= cid <= p.call_id_last
                                        and p.owns_call_id(cid) for cid in used) + n > size:
            return Refusal.POOL_EXHAUSTED  # (live IDs outside a range changed by a reload are free)
        for hi in client_his:
            if not self._has_room(conn, hi, used):
                return Refusal.POOL_EXHAUSTED
        return None

    def _has_room(self, conn: ControlConnection, client_hi: int, used: set[int]) -> bool:
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

    def allocate(self, conn: ControlConnection, client_call_hi: int, public_ip: bytes,
                 now: float) -> Call | None:
        """Map a new call of ``conn``; the caller has checked :meth:`refusal`.

        Should several new calls in one segment together leave no ID that keeps
        the high-byte rule (module docstring), the rule is relaxed for the last
        one rather than let its private Call ID out (``relaxed`` counts it).
        Returns None only when the pool is full.
        """
        pool_key = (public_ip, conn.server_ip)
        used = self.used.setdefault(pool_key, set())
        want_hi = conn.public_hi_for_client_hi(client_call_hi)
        avoid_hi = {c.public_call_id >> 8 for c in conn.calls}

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
        return self._register(Call(conn, client_call_hi, public_ip, cid, now))

    def _register(self, call: Call) -> Call:
        """Enter a new call in every index (the one place; :meth:`release` undoes it)."""
        self.used.setdefault((call.public_ip, call.server_ip), set()).add(call.public_call_id)
        self.by_public[(call.public_ip, call.server_ip, call.public_call_id)] = call
        self.per_client[call.client_ip] += 1
        call.conn.calls.append(call)
        if call.server_call_id is not None:
            self.by_server[(call.client_ip, call.server_ip, call.server_call_id)] = call
        self.schedule(call, call.expires(self.policy))
        return call

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

    def restore(self, rec: CallRecord, now: float) -> RestoreOutcome | None:
        """Put back a call a previous run mapped; why it was not (None: it was).

        The call gets its old public Call ID only if the table's invariants hold
        as they do for a new call: one live call per public Call ID and server,
        one per client Call ID in a connection, one per server Call ID of a client
        and server, the high-byte rule, the per-client,
        table and connection limits. Its control connection is created as needed:
        started, with unsynced streams (they pick up at the next segment that starts
        with a message header). Timers start at ``now``.
        """
        try:
            state = CallState(rec.state)
        except ValueError:
            return RestoreOutcome.INVALID
        cid, hi = rec.client_call_id, rec.client_call_hi
        if not (_u16(rec.public_call_id) and 0 <= hi <= 0xFF and 0 < rec.client_port <= 0xFFFF
                and 0 < rec.server_port <= 0xFFFF
                and (cid is None or (_u16(cid) and cid >> 8 == hi))
                and (rec.server_call_id is None or _u16(rec.server_call_id))):
            return RestoreOutcome.INVALID
        client_ip, server_ip = rec.client_address.packed, rec.server_address.packed
        public_ip = rec.public_address.packed
        used = self.used.setdefault((public_ip, server_ip), set())
        if rec.public_call_id in used:
            return RestoreOutcome.DUPLICATE
        if (rec.server_call_id is not None
                and (client_ip, server_ip, rec.server_call_id) in self.by_server):
            return RestoreOutcome.DUPLICATE  # outbound GRE could not tell the two apart
        key = (client_ip, rec.client_port, server_ip, rec.server_port)
        conn = self.connections.get(key)
        if conn is not None:
            if cid is not None and conn.call_by_client_id(cid) is not None:
                return RestoreOutcome.DUPLICATE
            if (conn.public_hi_for_client_hi(hi) not in (None, rec.public_call_id >> 8)
                    or conn.client_hi_for_public_hi(rec.public_call_id >> 8) not in (None, hi)):
                return RestoreOutcome.HIGH_BYTE_RULE
        if self.per_client[client_ip] >= self.policy.max_calls_per_client:
            return RestoreOutcome.CLIENT_LIMIT
        if len(self.by_public) >= self.policy.max_calls:
            return RestoreOutcome.TABLE_FULL
        conn = self.connection(key, now, create=True)
        if conn is None:
            return RestoreOutcome.TOO_MANY_CONNECTIONS
        call = Call(conn, hi, public_ip, rec.public_call_id, now)
        call.client_call_id = cid
        call.state = state
        call.server_call_id = rec.server_call_id
        self._register(call)
        return None

    def set_server_call_id(self, call: Call, server_call_id: int) -> None:
        if call.server_call_id is not None:
            key = (call.client_ip, call.server_ip, call.server_call_id)
            if self.by_server.get(key) is call:
                del self.by_server[key]
        call.server_call_id = server_call_id
        self.by_server[(call.client_ip, call.server_ip, server_call_id)] = call

    def set_state(self, call: Call, state: CallState, now: float) -> None:
        call.state = state
        call.since = now
        call.last_seen = now
        self.schedule(call, call.expires(self.policy))

    def release(self, call: Call) -> None:
        if call.released:
            return
        call.released = True
        del self.by_public[(call.public_ip, call.server_ip, call.public_call_id)]
        self.used[(call.public_ip, call.server_ip)].discard(call.public_call_id)
        if call.server_call_id is not None:
            key = (call.client_ip, call.server_ip, call.server_call_id)
            if self.by_server.get(key) is call:
                del self.by_server[key]
        self.per_client[call.client_ip] -= 1
        if not self.per_client[call.client_ip]:
            del self.per_client[call.client_ip]
        call.conn.calls.remove(call)

    # -- timers (lazy heap: an entry is a lower bound of the object's expiry) ------------

    def schedule(self, obj: Call | ControlConnection, when: float) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, obj))
        live = len(self.connections) + len(self.by_public)
        if len(self._timers) > TIMER_SLACK * live + TIMER_FLOOR:
            # Entries of released objects (and superseded ones) would otherwise stay
            # until their time comes, holding released calls and connections for up to
            # a timeout under churn: rebuild, one entry per live object.
            self.reschedule()

    def reschedule(self) -> None:
        """Re-arm every timer from the policy in force (its timeouts got shorter)."""
        self._timers = []
        for conn in self.connections.values():
            self.schedule(conn, conn.expires(self.policy))
        for call in self.by_public.values():
            self.schedule(call, call.expires(self.policy))

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].released:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def expired(self, now: float) -> Iterator[Call | ControlConnection]:
        """Yield each object whose expiry has passed; re-arm the others."""
        while self._timers and self._timers[0][0] <= now:  # (schedule may rebuild the heap)
            _, _, obj = heapq.heappop(self._timers)
            if obj.released:
                continue
            due = obj.expires(self.policy)
            if due <= now:
                yield obj
            else:
                self.schedule(obj, due)


def _u16(value: int) -> bool:
    return 0 <= value <= 0xFFFF
