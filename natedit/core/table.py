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
* ``ControlConnection.calls`` - the calls of one control connection, in the
  order they were mapped, and its ``index`` of them by client, public and server
  Call ID and by client, public and server high byte, for the control messages
  that name them: each lookup finds in O(1) the call a walk of ``calls`` in
  order would find first (thousands of calls on one connection stay cheap). A
  call joins and leaves them only through :meth:`ControlConnection.add_call`
  and ``remove_call``, and its client and server Call IDs are set only through
  :meth:`ControlConnection.set_ids` (the table's :meth:`CallTable._register`,
  :meth:`CallTable.release`, :meth:`CallTable.set_server_call_id`,
  :meth:`CallTable.restore`; the fields' new client Call ID).

Split fields. A Call ID field may be cut between two TCP segments, and the
first byte must be forwarded before the second is seen. So that one byte is
always enough to write the right high byte, the allocator keeps the map
between client and public *high bytes* one-to-one within each control
connection (:meth:`CallTable.allocate`): two calls of one connection share a
client high byte exactly when they share a public high byte. When no free ID
keeps that, the allocator relaxes it rather than refuse the call (counted:
``relaxed``); such a connection's split fields may then be dropped
(:mod:`natedit.core.fields`).
"""

from __future__ import annotations

import random
from bisect import insort
from collections import Counter
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address

from .allocator import Allocator
from .calls import TIMEOUTS, TRANSITIONS, Call, CallState, Outcome
from .errors import DropReason, Refusal, ReleaseReason, RestoreOutcome
from .events import CallEstablished, CallMapped, CallRecord, CallReleased
from .policy import Policy
from .stats import Outbox, Stats
from .stream import Stream
from .timers import TIMER_FLOOR, TIMER_SLACK, Timers
from .wire import Direction, MessageType

__all__ = ["TIMER_FLOOR", "TIMER_SLACK", "Call", "CallState", "CallTable", "ConnKey",
           "ControlConnection"]
ADDRESS_CACHE = 4096
"""Distinct addresses whose IPv4Address objects the table keeps for sharing."""
CONNECTION_SLACK = 16
"""Control connections a client may hold beyond ``max_calls_per_client``: ones being
opened or closed, or not yet forgotten after their calls ended (the idle timeout)."""

ConnKey = tuple[bytes, int, bytes, int]
"""(client address, client port, server address, server port), addresses packed."""


CLIENT_ID, PUBLIC_ID, SERVER_ID, CLIENT_HI, PUBLIC_HI, SERVER_HI = (k << 16 for k in range(6))
"""The kinds of key of a connection's index (``ControlConnection.index``): a key is
its kind | a Call ID (client, public, server) or a high byte (of those)."""


def index_keys(call: Call) -> list[int]:
    """The keys ``call`` has in its connection's index (its Call IDs known so far)."""
    public = call.public_call_id
    keys = [PUBLIC_ID | public, CLIENT_HI | call.client_call_hi, PUBLIC_HI | public >> 8]
    if call.client_call_id is not None:
        keys.append(CLIENT_ID | call.client_call_id)
    if call.server_call_id is not None:
        keys += (SERVER_ID | call.server_call_id, SERVER_HI | call.server_call_id >> 8)
    return keys


class ControlConnection:
    __slots__ = ("calls", "client_address", "client_ip", "client_port", "fin", "index", "key",
                 "last_seen", "next_order", "public_ip", "refused_at", "released",
                 "server_address", "server_ip", "server_port", "started", "streams")

    def __init__(self, key: ConnKey, now: float, *, started: bool = True,
                 addresses: tuple[IPv4Address, IPv4Address] | None = None) -> None:
        self.key = key
        self.client_ip, self.client_port, self.server_ip, self.server_port = key
        self.client_address, self.server_address = addresses or (
            IPv4Address(self.client_ip), IPv4Address(self.server_ip))
        """(The table gives its shared objects.)"""
        self.calls: dict[Call, int] = {}
        """The live calls, in the order they were mapped (each with its number in that
        order); joined and left through :meth:`add_call` and :meth:`remove_call` only."""
        self.next_order = 0
        """The number in ``calls`` of the next call to join."""
        self.index: dict[int, Call | list[Call]] = {}
        """The calls by each of their keys (:func:`index_keys`): the one call with the
        key, or the several that share it in the order of ``calls``, so that the first
        is the call a walk of ``calls`` in order finds first (also while several share a
        key: a server that hands out a live call's Call ID again). One dict of plain
        values per connection: many connections cost the garbage collector little."""
        self.streams = (Stream(), Stream())
        """Byte streams by Direction: client->server, server->client."""
        self.fin = [False, False]
        self.refused_at: list[int | None] = [None, None]
        """By Direction: sequence number of the last segment whose new calls were
        refused, so that its retransmissions are not counted again."""
        self.last_seen = now
        self.released = False
        self.public_ip: bytes | None = None
        """The address the connection is NATed to, as the edge last told it (or, until
        it tells one, the policy's first, pinned when the first call is set up); every
        call of the connection has it. None: not known yet, no call."""
        self.started = started
        """Whether calls may be set up: a Start-Control-Connection-Request was seen
        (either way), or natedit did not see the connection start (picked up
        mid-stream, or restored after a restart), so it cannot know."""

    def public_or(self, default: bytes) -> bytes:
        """The address its calls have (or get): the edge's, else ``default`` (the
        policy's first public address) while it has told none."""
        return default if self.public_ip is None else self.public_ip

    def expires(self, policy: Policy) -> float:
        return self.last_seen + policy.control_idle_timeout

    # -- its calls: the one place that keeps the index ---------------------------------

    def add_call(self, call: Call) -> None:
        """``call`` joins the connection (after its other calls) and the index."""
        self.calls[call] = self.next_order
        self.next_order += 1
        for key in index_keys(call):
            self._enter(call, key)

    def remove_call(self, call: Call) -> None:
        """``call`` leaves the connection and the index."""
        for key in index_keys(call):
            self._leave(call, key)
        del self.calls[call]

    def set_ids(self, call: Call, client_call_id: int | None = None,
                server_call_id: int | None = None) -> None:
        """Give ``call`` its client or server Call ID (None: that one unchanged); the
        only writer of them, which moves the call in the index when it has joined."""
        joined = call in self.calls
        if client_call_id is not None:
            old = call.client_call_id
            if joined and old is not None:
                self._leave(call, CLIENT_ID | old)
            call.client_call_id = client_call_id
            if joined:
                self._enter(call, CLIENT_ID | client_call_id)
        if server_call_id is not None:
            old = call.server_call_id
            if joined and old is not None:
                self._leave(call, SERVER_ID | old)
                self._leave(call, SERVER_HI | old >> 8)
            call.server_call_id = server_call_id
            if joined:
                self._enter(call, SERVER_ID | server_call_id)
                self._enter(call, SERVER_HI | server_call_id >> 8)

    def _enter(self, call: Call, key: int) -> None:
        held = self.index.setdefault(key, call)
        if held is call:
            return
        if isinstance(held, list):
            if self.calls[held[-1]] < self.calls[call]:
                held.append(call)  # (the newest call)
            else:
                insort(held, call, key=self.calls.__getitem__)
        else:
            self.index[key] = sorted((held, call), key=self.calls.__getitem__)

    def _leave(self, call: Call, key: int) -> None:
        held = self.index[key]
        if held is call:
            del self.index[key]
        else:
            assert isinstance(held, list)
            held.remove(call)
            if len(held) == 1:
                self.index[key] = held[0]

    def first(self, key: int) -> Call | None:
        """The first call in order with ``key`` (a kind | a value), or None."""
        held = self.index.get(key)
        return held[0] if isinstance(held, list) else held

    def calls_with(self, key: int) -> Sequence[Call]:
        """The calls with ``key``, in order."""
        held = self.index.get(key)
        return () if held is None else held if isinstance(held, list) else (held,)

    def call_by_client_id(self, call_id: int) -> Call | None:
        held = self.index.get(CLIENT_ID | call_id)  # (first(), inlined: per message)
        return held[0] if isinstance(held, list) else held

    def call_by_public_id(self, call_id: int) -> Call | None:
        held = self.index.get(PUBLIC_ID | call_id)  # (first(), inlined: per message)
        return held[0] if isinstance(held, list) else held

    def call_by_server_id(self, call_id: int) -> Call | None:
        held = self.index.get(SERVER_ID | call_id)  # (first(), inlined: per message)
        return held[0] if isinstance(held, list) else held

    def public_hi_for_client_hi(self, hi: int) -> int | None:
        call = self.first(CLIENT_HI | hi)
        return None if call is None else call.public_call_id >> 8

    def client_hi_for_public_hi(self, hi: int) -> int | None:
        call = self.first(PUBLIC_HI | hi)
        return None if call is None else call.client_call_hi

    def public_his_for_client_hi(self, hi: int) -> set[int]:
        """The public high bytes of the calls with client high byte ``hi`` (one under
        the high-byte rule; maybe several once the allocator relaxed it)."""
        return {c.public_call_id >> 8 for c in self.calls_with(CLIENT_HI | hi)}

    def client_his_for_public_hi(self, hi: int) -> set[int]:
        """The client high bytes of the calls with public high byte ``hi``."""
        return {c.client_call_hi for c in self.calls_with(PUBLIC_HI | hi)}

    def uses_public_hi(self, hi: int) -> bool:
        """Whether a call of the connection has a public Call ID in block ``hi``."""
        return PUBLIC_HI | hi in self.index


class CallTable:
    """Calls and control connections, their indexes, the allocator and timers."""

    def __init__(self, policy: Policy, rng: random.Random,
                 outbox: Outbox | None = None) -> None:
        self.policy = policy
        self.rng = rng
        self.outbox = outbox if outbox is not None else Outbox(Stats())
        """Where the table counts (``outbox.stats``) and tells (``outbox.events``) what it
        did to calls: the translator's."""
        self.connections: dict[ConnKey, ControlConnection] = {}
        self.by_public: dict[tuple[bytes, bytes, int], Call] = {}
        self.by_server: dict[tuple[bytes, bytes, int], Call] = {}
        self._shadowed: dict[tuple[bytes, bytes, int], list[Call]] = {}
        """Live calls whose ``by_server`` key a later call of the same client took (a
        server that hands out a live call's Call ID again, as pptpd does when its IDs
        wrap): each gets the key back when the holder ends, so no live call is ever left
        without its outbound GRE. Outbound GRE carries only the server's Call ID, so
        while two calls share it the server cannot tell them apart either, and the
        rewrite (the client's address to its public one) is the same for both."""
        self.per_client: Counter[bytes] = Counter()
        self.connections_per_client: Counter[bytes] = Counter()
        self.allocator = Allocator(policy, rng)
        self.used = self.allocator.used
        """Public Call IDs in use per (public address, server address)."""
        self._addresses: dict[bytes, IPv4Address] = {}
        """One IPv4Address per address in use, shared by the listings and events of its
        calls and connections (at most :data:`ADDRESS_CACHE` kept)."""
        self.timers = Timers(policy, self._live, self._live_count)
        self.schedule = self.timers.schedule
        self.next_deadline = self.timers.next_deadline
        self.expired = self.timers.expired

    @property
    def relaxed(self) -> int:
        """Calls mapped without the high-byte rule (see :meth:`Allocator.pick`)."""
        return self.allocator.relaxed

    def set_policy(self, policy: Policy) -> None:
        """Limits and timeouts from now on; timers re-armed when a timeout got shorter."""
        old, self.policy = self.policy, policy
        self.timers.policy = self.allocator.policy = policy
        if (policy.request_timeout < old.request_timeout
                or policy.call_idle_timeout < old.call_idle_timeout
                or policy.control_idle_timeout < old.control_idle_timeout):
            self.timers.rebuild()

    def _live_count(self) -> int:
        return len(self.connections) + len(self.by_public)

    def _live(self) -> Iterator[Call | ControlConnection]:
        yield from self.connections.values()
        yield from self.by_public.values()

    # -- listing ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.by_public)

    def calls(self) -> Iterator[Call]:
        """Every live call (a copy of the listing: the table may change meanwhile)."""
        return iter(list(self.by_public.values()))

    def connection_count(self) -> int:
        """Tracked control connections."""
        return len(self.connections)

    def client_count(self) -> int:
        """Private addresses with at least one live call."""
        return len(self.per_client)

    def ids_in_use(self) -> list[tuple[bytes, bytes, int]]:
        """(public address, server, public Call IDs in use) per pool that has been used."""
        return [(public, server, len(ids)) for (public, server), ids in list(self.used.items())]

    def blocks_in_use(self) -> list[tuple[bytes, bytes, int, int]]:
        """(public address, server, blocks of 256 public Call IDs with a live call, live
        calls in the fullest block) per pool used (:mod:`natedit.core.allocator`)."""
        return self.allocator.blocks_in_use()

    # -- control connections -----------------------------------------------------------

    def connection(self, key: ConnKey, now: float, create: bool,
                   started: bool = True) -> ControlConnection | None:
        conn = self.connections.get(key)
        if conn is None and create:
            if self.connection_refusal(key[0]) is not None:
                return None
            conn = ControlConnection(key, now, started=started,
                                     addresses=(self._public(key[0]), self._public(key[2])))
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
        if not self.allocator.has_room(conn, public_ip, client_his):
            return Refusal.POOL_EXHAUSTED
        return None

    def allocate(self, conn: ControlConnection, client_call_hi: int, public_ip: bytes,
                 now: float) -> Call | None:
        """Map a new call of ``conn``; the caller has checked :meth:`refusal`.
        Returns None only when the pool is full (see :meth:`Allocator.pick`)."""
        cid = self.allocator.pick(conn, client_call_hi, public_ip)
        if cid is None:
            return None
        return self._register(Call(conn, client_call_hi, self._public(public_ip), cid, now))

    def _public(self, ip: bytes) -> IPv4Address:
        """``IPv4Address(ip)``, one object per address (a bounded cache)."""
        address = self._addresses.get(ip)
        if address is None:
            if len(self._addresses) >= ADDRESS_CACHE:
                self._addresses.clear()
            address = self._addresses[ip] = IPv4Address(ip)
        return address

    def _register(self, call: Call) -> Call:
        """Enter a new call in every index (the one place; :meth:`release` undoes it)."""
        self.allocator.take((call.public_ip, call.server_ip), call.public_call_id)
        self.by_public[(call.public_ip, call.server_ip, call.public_call_id)] = call
        self.per_client[call.client_ip] += 1
        call.conn.add_call(call)
        if call.server_call_id is not None:
            self._take_server_key(call, call.server_call_id)
        self.schedule(call, call.expires(self.policy))
        return call

    def _take_server_key(self, call: Call, server_call_id: int) -> None:
        key = (call.client_ip, call.server_ip, server_call_id)
        holder = self.by_server.get(key)
        if holder is not None and holder is not call:
            self._shadowed.setdefault(key, []).append(holder)
        self.by_server[key] = call

    def _leave_server_key(self, call: Call) -> None:
        if call.server_call_id is None:
            return
        key = (call.client_ip, call.server_ip, call.server_call_id)
        waiting = self._shadowed.get(key)
        if self.by_server.get(key) is call:
            if waiting:
                self.by_server[key] = waiting.pop()  # the latest before it
            else:
                del self.by_server[key]
        elif waiting and call in waiting:
            waiting.remove(call)
        if waiting is not None and not waiting:
            del self._shadowed[key]

    def restore(self, rec: CallRecord, now: float) -> RestoreOutcome | None:
        """Put back a call a previous run mapped; why it was not (None: it was).

        The call gets its old public Call ID only if the table's invariants hold as they do
        for a new call: one live call per public Call ID and server, one per client Call ID
        in a connection, one public address per connection, the per-client, table and
        connection limits (not the high-byte rule, which the allocator relaxes when no free
        ID keeps it; nor one call per server Call ID). Its control connection is created as
        needed: started, NATed to the record's address, unsynced streams; timers at ``now``.
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
        if rec.public_call_id in self.used.get((public_ip, server_ip), ()):
            return RestoreOutcome.DUPLICATE
        key = (client_ip, rec.client_port, server_ip, rec.server_port)
        conn = self.connections.get(key)
        if conn is not None and conn.public_ip not in (None, public_ip):
            return RestoreOutcome.PUBLIC_ADDRESS
        if conn is not None and cid is not None and conn.call_by_client_id(cid) is not None:
            return RestoreOutcome.DUPLICATE
        if self.per_client[client_ip] >= self.policy.max_calls_per_client:
            return RestoreOutcome.CLIENT_LIMIT
        if len(self.by_public) >= self.policy.max_calls:
            return RestoreOutcome.TABLE_FULL
        conn = self.connection(key, now, create=True)
        if conn is None:
            return RestoreOutcome.TOO_MANY_CONNECTIONS
        conn.public_ip = public_ip
        call = Call(conn, hi, self._public(public_ip), rec.public_call_id, now)
        conn.set_ids(call, cid, rec.server_call_id)
        call.state = state
        self._register(call)
        return None

    def set_server_call_id(self, call: Call, server_call_id: int) -> None:
        self._leave_server_key(call)
        call.conn.set_ids(call, server_call_id=server_call_id)
        self._take_server_key(call, server_call_id)

    # -- the lifecycle (calls.TRANSITIONS, the only way a call changes state) -----------

    def apply(self, call: Call, d: Direction, mt: MessageType, outcome: Outcome, now: float,
              server_call_id: int | None = None, new: bool = False) -> bool:
        """Apply the complete message ``mt`` that names ``call`` (made it: ``new``);
        False when its state has no step for it (nothing changes).

        A reply's ``server_call_id`` is learnt first. A new call is told
        (:class:`CallMapped`) as mapped: after a step into a state without an event of
        its own, before one that establishes or ends it.
        """
        step = TRANSITIONS.get((call.state, d, mt, outcome))
        if step is None:
            return False
        if server_call_id is not None:
            self.set_server_call_id(call, server_call_id)
        state = step.state
        if new:
            self.outbox.stats.calls_mapped += 1
            call.last_seen = now
            if state is not None and state is not CallState.ESTABLISHED:
                self._enter(call, state, now)
                self.outbox.events.append(CallMapped(call.info()))
                return True
            self.outbox.events.append(CallMapped(call.info()))
        if step.release is not None:
            self.release(call, step.release)
        else:
            assert state is not None
            self._enter(call, state, now, step.again)
        return True

    def _enter(self, call: Call, state: CallState, now: float, again: bool = False) -> None:
        call.last_seen = now
        if state is call.state and not again:
            return  # touched: its idle timer restarts
        call.state = state
        call.since = now
        self.schedule(call, call.expires(self.policy))
        if state is CallState.ESTABLISHED:
            self.outbox.events.append(CallEstablished(call.info()))

    def release(self, call: Call, reason: ReleaseReason) -> None:
        """End a call: out of every index, counted and told (:class:`CallReleased`)."""
        if call.released:
            return
        info = call.info()
        call.released = True
        del self.by_public[(call.public_ip, call.server_ip, call.public_call_id)]
        self.allocator.free((call.public_ip, call.server_ip), call.public_call_id)
        self._leave_server_key(call)
        self.per_client[call.client_ip] -= 1
        if not self.per_client[call.client_ip]:
            del self.per_client[call.client_ip]
        call.conn.remove_call(call)
        self.outbox.stats.calls_released[reason] += 1
        self.outbox.events.append(CallReleased(info, reason))

    def end_calls(self, conn: ControlConnection, reason: ReleaseReason) -> None:
        for call in list(conn.calls):
            self.release(call, reason)

    def close_connection(self, conn: ControlConnection, reason: ReleaseReason) -> None:
        self.end_calls(conn, reason)
        self.forget_connection(conn)

    def expire(self, now: float) -> None:
        """Release the calls and forget the connections whose timers ran out by ``now``."""
        for obj in self.expired(now):
            if isinstance(obj, Call):
                self.release(obj, TIMEOUTS[obj.state].release)
            else:
                assert isinstance(obj, ControlConnection)
                self.close_connection(obj, ReleaseReason.CONTROL_IDLE)


def _u16(value: int) -> bool:
    return 0 <= value <= 0xFFFF
