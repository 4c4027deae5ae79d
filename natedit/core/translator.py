"""The sans-I/O translator: packets, a direction and a clock in; verdicts out.

Theory of operation
-------------------
natedit sits on a client-side NAT. Each client picks its own Call ID; the
server only sees the gateway's one public address, so two clients that pick
the same Call ID toward the same server are indistinguishable to it, and
its GRE comes back addressed to a Call ID that two clients own. natedit
gives every call a *public* Call ID unique per (public address, server) and
rewrites, like a NAT rewrites ports:

* the control conversation (TCP 1723), where the client's Call ID appears:
  every Call ID that an *outbound* message carries as the sender's own goes
  private -> public (Outgoing-Call-Request, Incoming-Call-Reply,
  Call-Clear-Request, ...), and every Peer's Call ID an *inbound* message
  carries goes public -> private (Outgoing-Call-Reply, Incoming-Call-
  Connected, WAN-Error-Notify, Set-Link-Info). ``wire.CALL_ID_FIELDS`` is
  that table. Call-Disconnect-Notify is the odd one (see ``fields``).
* enhanced GRE: inbound packets carry the public Call ID; they are matched
  on (public address, server, public Call ID) and get the client's address
  and Call ID. Outbound packets carry the server's Call ID; they are matched
  on (client, server, server Call ID) and get the public source address.

Every rewrite keeps the length, so TCP sequence numbers never move; the TCP
checksum (control) and the IP header checksum (GRE) are adjusted
incrementally (RFC 1624). Control messages are framed by their Length field
across segments (``stream.py``); a segment is first framed without side
effects, then, if it is let through, its messages are applied in order.

Verdicts and reasons. Every packet gets ``accept`` (perhaps with new bytes)
or ``drop``; ``reason`` names every drop and every deliberate pass-through,
and :class:`Stats` counts them.

=================  ======  =========================================================
reason             action  when
=================  ======  =========================================================
(none)             accept  translated, or not natedit's business at all
not_pptp_gre       accept  GRE that is not enhanced GRE v1 carrying PPP
not_ours           accept  GRE to an address natedit does not own; a TCP fragment after the
                           first (no ports: its first fragment decides)
unsynced           accept  control data of a connection whose start natedit missed
duplicate_syn      accept  a SYN/SYN-ACK with its stream's initial sequence: nothing changes
malformed (*)      drop    control message failing validation (policy: or accept)
gap                drop    segment beyond the next expected byte (TCP resends it)
no_call            drop    GRE that no live call owns (also a spoofed server address)
foreign_call_id    drop    an outbound message naming as its own a Call ID that is no call
                           of its connection but another connection's live public Call ID
fragment           drop    a GRE fragment, or the first fragment of TCP 1723 (the kernel
                           defragments before the queue)
history_rewritten  drop    a retransmission whose bytes differ from the unacknowledged ones
                           inspected (``Stream.history_check``)
refused:<why>      drop    a new call over a limit or denied by the ACL (see below)
too_many_connections drop  control connection table full
client_connection_limit drop  the client holds max_calls_per_client + 16 connections
short_ip, ...      drop    a packet that does not parse (ProtocolError reasons)
split_call_id_undecided  accept  (counted only) a Call ID cut after its first byte whose
                   high byte no rule could decide: the field is left as it came
unknown_call_id    accept  (counted only, per message) a Call ID field naming no call of
                           its control connection: the field is left as it came
unexpected_message accept  (counted only, per message) a message naming a call in a state
                           with no step for it (``calls.TRANSITIONS``): the call is unchanged
=================  ======  =========================================================
(*) the reason is the ProtocolError's: bad_length, bad_cookie, ...

Control connections and their messages (validation, refusals, the call
each message names) are :mod:`natedit.core.control`'s and
:mod:`natedit.core.fields`'s; GRE is :mod:`natedit.core.gre`'s; the call
lifecycle is a table (:mod:`natedit.core.calls`) that only the call table
applies (:mod:`natedit.core.table`).

Restarts. The core keeps no files: :meth:`Translator.snapshot` and
:meth:`Translator.call_record` give the live calls as :class:`CallRecord`
values, which an edge stores (``natedit.state``) whenever an event names a
call, and :meth:`Translator.restore` puts them back in a new translator with
their public Call IDs, so GRE flows again at once after a worker restart.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable

from .admission import Admission
from .control import Control
from .errors import PassReason, ProtocolError, RestoreOutcome
from .events import ACCEPT, Action, CallInfo, CallRecord, Event, GreRoute, Verdict
from .gre import Gre
from .policy import Policy
from .stats import Outbox, Stats
from .table import CallTable
from .wire import IPPROTO_GRE, IPPROTO_TCP, Direction, ipv4_lengths

__all__ = ["Stats", "Translator"]


class Translator:
    """The PPTP NAT editor core. No I/O: feed it packets and the time."""

    def __init__(self, policy: Policy, *, rng: random.Random | None = None) -> None:
        if policy.public_address is None:
            raise ValueError("the core needs policy.public_address resolved")
        self.policy = policy
        self.public_ip = policy.public_address.packed
        """The policy's first public address: a connection's while the edge tells none."""
        self.publics = frozenset(a.packed for a in policy.public_addresses)
        """Every public address (packed): calls may have any of them."""
        self.rng = rng if rng is not None else random.SystemRandom()
        self.stats = Stats()
        self.outbox = Outbox(self.stats)
        self.table = CallTable(policy, self.rng, self.outbox)
        self.admission = Admission(policy)
        self.control = Control(self.table, self.admission, self.outbox,
                               tuple(a.packed for a in policy.public_addresses))
        self.gre = Gre(self.table, self.stats, self.publics)
        # GRE, the common case, for the queue worker's per-packet path: the translated
        # packet, or None (anything else: ask handle_packet). See natedit.core.gre.
        self.gre_in_fast: Callable[[bytes, float], bytes | None] = self.gre.inbound
        self.gre_out_fast: Callable[[bytes, float], bytes | None] = self.gre.outbound

    # -- public API -----------------------------------------------------------------------

    def handle_packet(self, data: bytes, direction: Direction, now: float,
                      public: bytes | None = None) -> Verdict:
        """Decide one IPv4 packet crossing the gateway in ``direction`` at time ``now``.

        ``public``: for a TCP 1723 segment, the address (packed) its control connection
        is NATed to, as the edge found it (conntrack); None: unknown, the connection
        keeps the one it has (see :mod:`natedit.core.control`)."""
        outbox = self.outbox
        try:
            ihl, total = ipv4_lengths(data)
            proto = data[9]
            if proto == IPPROTO_GRE:
                out = self.gre.decide(data, ihl, direction, now)
                if isinstance(out, bytes):
                    return Verdict(Action.ACCEPT, out)
                action = Action.ACCEPT if isinstance(out, PassReason) else Action.DROP
                return outbox.verdict(action, out)
            if proto == IPPROTO_TCP:
                return self.control.handle(data, ihl, total, direction, now, public)
            return ACCEPT
        except ProtocolError as exc:
            return outbox.verdict(Action.DROP, exc.reason, violation=exc)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` should next be called (None: no timers)."""
        return self.table.next_deadline()

    def handle_timer(self, now: float) -> list[Event]:
        """Expire requests, idle calls and idle control connections due by ``now``."""
        self.table.expire(now)
        return self.outbox.take()

    def calls(self) -> list[CallInfo]:
        """The live call table, one snapshot per call."""
        return [call.info() for call in self.table.calls()]

    # -- persistence (the edge stores the records; the core never touches a file) -------

    def snapshot(self) -> list[CallRecord]:
        """Every live call, as records :meth:`restore` takes back."""
        return [call.record() for call in self.table.calls()]

    def call_record(self, info: CallInfo) -> CallRecord | None:
        """The live call holding the public Call ID ``info`` names, or None (released).

        An edge that persists the table rewrites the record of each call an event
        names (CallMapped, CallEstablished, CallReleased): GRE makes no events.
        """
        call = self.table.by_public.get(
            (info.public_address.packed, info.server_address.packed, info.public_call_id))
        return None if call is None else call.record()

    def restore(self, records: Iterable[CallRecord], now: float) -> Counter[str]:
        """Put back the calls of a previous run (a restart); before any packet.

        Returns how many were ``restored`` and, by reason, how many were not: a
        public address that is none of the policy's (``public_address``), a client the
        running policy does not put inside (0.0.0.0, a public address but the call's own,
        which is the gateway's own client's, outside ``inside_networks``:
        ``client_address``), a server that is inside, 0.0.0.0 or a public address
        (``server_address``), or a record that would break the table's invariants
        (see :meth:`CallTable.restore`). A restored
        call keeps its public Call ID, so GRE flows again at once; its idle and
        request timers start at ``now``.
        """
        outcome: Counter[str] = Counter()
        policy, publics = self.policy, self.publics
        for rec in records:
            client, server = rec.client_address, rec.server_address
            if rec.public_address.packed not in publics:
                reason: RestoreOutcome | None = RestoreOutcome.PUBLIC_ADDRESS
            elif (client.is_unspecified
                  or (client.packed in publics and client != rec.public_address)
                  or not (policy.is_inside(client) or client == rec.public_address)):
                reason = RestoreOutcome.CLIENT_ADDRESS
            elif (server.is_unspecified or server.packed in publics
                  or policy.is_inside(server)):
                reason = RestoreOutcome.SERVER_ADDRESS
            else:
                reason = self.table.restore(rec, now)
            outcome[reason or RestoreOutcome.RESTORED] += 1
        self.stats.calls_restored += outcome[RestoreOutcome.RESTORED]
        return outcome

    # -- GRE translated outside the core (the kernel fast path, at the edge) -----------

    def gre_route(self, key: tuple[bytes, bytes, int]) -> GreRoute | None:
        """The route of the call holding ``key`` (public address, server, public Call ID),
        or None: no such call, or not established (nor closing) with both Call IDs known.

        An edge that translates GRE itself (:mod:`natedit.fastpath`) keeps exactly
        these routes; any other GRE still comes to :meth:`handle_packet`.
        """
        call = self.table.by_public.get(key)
        return None if call is None else self.gre.route(call)

    def gre_route_outbound(self, key: tuple[bytes, bytes, int]) -> GreRoute | None:
        """The route of the call outbound GRE keyed (client, server, server Call ID) goes to."""
        call = self.table.by_server.get(key)
        return None if call is None else self.gre.route(call)

    def gre_routes(self) -> list[GreRoute]:
        """Every call's route (see :meth:`gre_route`)."""
        return [r for r in map(self.gre.route, self.table.calls()) if r is not None]

    def note_gre(self, key: tuple[bytes, bytes, int], direction: Direction, packets: int,
                 nbytes: int, now: float) -> None:
        """Count GRE translated outside :meth:`handle_packet` for the call ``key`` names
        (public address, server, public Call ID): the totals always, the call's own
        counters and idle timer (restarted at ``now``) while it lives."""
        self.gre.note(key, direction, packets, nbytes, now)

    def set_policy(self, policy: Policy) -> None:
        """Use ``policy`` from now on (a reload).

        Limits, ACLs, the Call ID range and the allocation apply to new calls and
        connections: live calls keep their mappings and public Call IDs (also outside
        a new range), and a tighter limit does not cut them. Timeouts apply to
        everything at once. The public addresses cannot change (ValueError).
        """
        if policy.public_address is None:
            raise ValueError("the core needs policy.public_address resolved")
        if policy.public_addresses != self.policy.public_addresses:
            raise ValueError("the public addresses cannot change while calls may be live")
        self.policy = policy
        self.table.set_policy(policy)
        self.admission.set_policy(policy)
