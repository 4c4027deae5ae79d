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
  Connected, WAN-Error-Notify, Set-Link-Info). ``_FIELDS`` is that table.
  Call-Disconnect-Notify is the odd one: see ``_decide_disconnect``.
* enhanced GRE: inbound packets carry the public Call ID; they are matched
  on (public address, server, public Call ID) and get the client's address
  and Call ID. Outbound packets carry the server's Call ID; they are matched
  on (client, server, server Call ID) and get the public source address.

Every rewrite keeps the length, so TCP sequence numbers never move; the TCP
checksum (control) and the IP header checksum (GRE) are adjusted
incrementally (RFC 1624). Control messages are framed by their Length field
across segments (``_stream.py``); a segment is first framed without side
effects, then, if it is let through, its messages are applied in order.

Verdicts and reasons. Every packet gets ``accept`` (perhaps with new bytes)
or ``drop``; ``reason`` names every drop and every deliberate pass-through,
and :class:`Stats` counts them.

=================  ======  =========================================================
reason             action  when
=================  ======  =========================================================
(none)             accept  translated, or not natedit's business at all
not_pptp_gre       accept  GRE that is not enhanced GRE v1 carrying PPP
not_ours           accept  GRE to an address natedit does not own
unsynced           accept  control data of a connection whose start natedit missed
malformed (*)      drop    control message failing validation (policy: or accept)
gap                drop    segment beyond the next expected byte (TCP resends it)
no_call            drop    GRE that no live call owns (also a spoofed server address)
foreign_call_id    drop    an outbound message naming as its own a Call ID that is no call
                           of its connection but another connection's live public Call ID
fragment           drop    a GRE fragment (the kernel defragments before the queue)
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

Hostile and confused control traffic. Headers are validated before any
read (``wire.parse_control_header``: at least 12 bytes, PPTP message type 1,
magic cookie, control type 1..15, then Length equal to that type's exact
size), so Length 0, below 12, below or above the type's size and huge all
end as ``bad_length`` before a byte of the body is trusted; a Length beyond
the bytes that came is a message that continues in the next segment. Every
Call ID a message names is looked up in *its own control connection* only
(``_decide``): a Call-Clear-Request, a reply or a Call-Disconnect-Notify for
a call that does not exist or is another client's changes nothing in the
table and goes out as it came (``unknown_call_id``), unless letting it out
would name another client's call to the server (``foreign_call_id``). A
second Outgoing-Call-Request reusing a live Call ID of the same connection
replaces that call (released as ``replaced``); another client's calls with
the same private Call ID are on other connections and untouched. A
connection natedit saw from its SYN may set up calls only after a
Start-Control-Connection-Request (``refused:not_started``); one picked up
mid-stream or restored after a restart is taken as started.

Refusals. Only where something new starts, never per GRE packet. A control
connection natedit has not seen yet is dropped (``refused:client_denied``,
``refused:server_denied``) when the policy's ACL denies its client or its
server: it is never tracked, so each of its packets is decided again. A
segment carrying new calls (``_check_new_calls``) is dropped whole, with no
change to the stream or the table, when the ACL denies them (an existing
connection after a reload), a limit is reached (``client_limit``,
``table_full``, ``pool_exhausted``) or the client's new-call rate is spent
(``rate_limited``); TCP retransmits it and it is decided again, so it goes
through once the reason is gone. ``Stats.calls_refused`` counts a refused
request once, not its retransmissions.

Restarts. The core keeps no files: :meth:`Translator.snapshot` and
:meth:`Translator.call_record` give the live calls as :class:`CallRecord`
values, which an edge stores (``natedit.state``) whenever an event names a
call, and :meth:`Translator.restore` puts them back in a new translator with
their public Call IDs, so GRE flows again at once after a worker restart.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Iterable
from ipaddress import IPv4Address

from .admission import Admission
from .calls import Call, CallState, Outcome
from .checksum import apply_delta
from .errors import (
    DropReason,
    Malformed,
    PassReason,
    ProtocolError,
    Reason,
    Refusal,
    ReleaseReason,
    RestoreOutcome,
)
from .events import (
    ACCEPT,
    Action,
    CallInfo,
    CallRecord,
    CallRefused,
    ConnectionRefused,
    Event,
    GreRoute,
    Verdict,
)
from .policy import DisconnectRule, MalformedAction, Policy
from .stats import Outbox, Stats
from .stream import SEQ_MOD, Piece, Stream, frame
from .table import CallTable, ControlConnection
from .wire import (
    CALL_ID_FIELDS,
    IPPROTO_GRE,
    IPPROTO_TCP,
    PPTP_PORT,
    RESULT_CODE_OFFSET,
    RESULT_CONNECTED,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    CallIdField,
    Direction,
    FieldKind,
    MessageType,
    is_pptp_gre,
    parse_control_header,
)

MT = MessageType
OUT = Direction.OUTBOUND
IN = Direction.INBOUND

_U16 = struct.Struct("!H")
_GRE = struct.Struct("!BBHHH")
_IN_HEAD = struct.Struct("!10sH4s4s6sH")
"""IP header to the checksum, checksum, source, destination; GRE to the Call ID, Call ID."""
_OUT_HEAD = struct.Struct("!10sH4s")
_FAST_GRE = frozenset(bytes((f0, f1, 0x88, 0x0B)) for f0 in (0x20, 0x30) for f1 in (0x01, 0x81))
"""The first four bytes of the enhanced GRE the shortcuts take (key; sequence number
or not; acknowledgement or not; protocol PPP); other valid ones go to handle_packet."""
_TCP = struct.Struct("!HHI")
_NEW, _OWN, _PEER, _SERVER = FieldKind.NEW, FieldKind.OWN, FieldKind.PEER, FieldKind.SERVER
_NAMED = -1
"""The key of ``Stream.partial`` (the stream's scratch for the message in progress,
cleared when it completes or the stream resynchronises) under which the call the
message's Call ID field named is kept, with the message's first sequence number:
the message's call is found once, when its field is read, and used when it completes."""
_START_REQUEST = MT.START_CONTROL_CONNECTION_REQUEST
_STOPS = (MT.STOP_CONTROL_CONNECTION_REQUEST, MT.STOP_CONTROL_CONNECTION_REPLY)
_DIRECTION_NAMES = tuple(d.name.lower() for d in Direction)
_MT_NAMES = {mt: mt.name for mt in MessageType}


class Translator:
    """The PPTP NAT editor core. No I/O: feed it packets and the time."""

    def __init__(self, policy: Policy, *, rng: random.Random | None = None) -> None:
        if policy.public_address is None:
            raise ValueError("the core needs policy.public_address resolved")
        self.policy = policy
        self.public_ip = policy.public_address.packed
        self.rng = rng if rng is not None else random.SystemRandom()
        self.stats = Stats()
        self.outbox = Outbox(self.stats)
        self.table = CallTable(policy, self.rng, self.outbox)
        self.admission = Admission(policy)

    # -- public API -----------------------------------------------------------------------

    def handle_packet(self, data: bytes, direction: Direction, now: float) -> Verdict:
        """Decide one IPv4 packet crossing the gateway in ``direction`` at time ``now``."""
        try:
            if len(data) < 20 or data[0] >> 4 != 4:
                raise ProtocolError(Malformed.SHORT_IP if len(data) < 20 else Malformed.NOT_IPV4)
            ihl = (data[0] & 0x0F) * 4
            total = (data[2] << 8) | data[3]
            if ihl < 20 or total < ihl or total > len(data):
                raise ProtocolError(Malformed.BAD_IP_HEADER, f"IHL {ihl}, total length {total}")
            proto = data[9]
            if proto == IPPROTO_GRE:
                if direction is IN:
                    return self._gre_in(data, ihl, now)
                return self._gre_out(data, ihl, now)
            if proto == IPPROTO_TCP:
                return self._tcp(data, ihl, total, direction, now)
            return ACCEPT
        except ProtocolError as exc:
            return self._verdict(Action.DROP, exc.reason, violation=exc)

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
        different public address (``public_address``), a client the running policy
        does not put inside (0.0.0.0, the public address, outside ``inside_networks``:
        ``client_address``), a server that is inside, 0.0.0.0 or the public address
        (``server_address``), or a record that would break the table's invariants
        (see :meth:`CallTable.restore`). A restored
        call keeps its public Call ID, so GRE flows again at once; its idle and
        request timers start at ``now``.
        """
        outcome: Counter[str] = Counter()
        policy = self.policy
        for rec in records:
            client, server = rec.client_address, rec.server_address
            if rec.public_address.packed != self.public_ip:
                reason: RestoreOutcome | None = RestoreOutcome.PUBLIC_ADDRESS
            elif (client.is_unspecified or client.packed == self.public_ip
                  or not policy.is_inside(client)):
                reason = RestoreOutcome.CLIENT_ADDRESS
            elif (server.is_unspecified or server.packed == self.public_ip
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
        return None if call is None else self._route(call)

    def gre_route_outbound(self, key: tuple[bytes, bytes, int]) -> GreRoute | None:
        """The route of the call outbound GRE keyed (client, server, server Call ID) goes to."""
        call = self.table.by_server.get(key)
        return None if call is None else self._route(call)

    def gre_routes(self) -> list[GreRoute]:
        """Every call's route (see :meth:`gre_route`)."""
        return [r for r in map(self._route, self.table.calls()) if r is not None]

    def _route(self, call: Call) -> GreRoute | None:
        if (call.state not in (CallState.ESTABLISHED, CallState.CLOSING)
                or call.client_call_id is None or call.server_call_id is None):
            return None
        owns = self.table.by_server.get((call.client_ip, call.server_ip,
                                         call.server_call_id)) is call
        return GreRoute(call.public_ip, call.server_ip, call.public_call_id, call.client_ip,
                        call.client_call_id, call.server_call_id, owns)

    def note_gre(self, key: tuple[bytes, bytes, int], direction: Direction, packets: int,
                 nbytes: int, now: float) -> None:
        """Count GRE translated outside :meth:`handle_packet` for the call ``key`` names
        (public address, server, public Call ID): the totals always, the call's own
        counters and idle timer (restarted at ``now``) while it lives."""
        if packets <= 0:
            return
        d = int(direction)
        self.stats.gre_packets[d] += packets
        self.stats.gre_bytes[d] += nbytes
        call = self.table.by_public.get(key)
        if call is not None:
            call.gre_packets[d] += packets
            call.gre_bytes[d] += nbytes
            if now > call.last_seen:
                call.last_seen = now

    def set_policy(self, policy: Policy) -> None:
        """Use ``policy`` from now on (a reload).

        Limits, ACLs, the Call ID range and the allocation apply to new calls and
        connections: live calls keep their mappings and public Call IDs (also outside
        a new range), and a tighter limit does not cut them. Timeouts apply to
        everything at once. The public address cannot change (ValueError).
        """
        if policy.public_address is None:
            raise ValueError("the core needs policy.public_address resolved")
        if policy.public_address.packed != self.public_ip:
            raise ValueError("the public address cannot change while calls may be live")
        self.policy = policy
        self.table.set_policy(policy)
        self.admission.set_policy(policy)

    # -- verdict helpers ----------------------------------------------------------------

    def _verdict(self, action: Action, reason: Reason | None, data: bytes | None = None,
                 violation: ProtocolError | None = None) -> Verdict:
        return self.outbox.verdict(action, reason, data, violation)

    # -- GRE ------------------------------------------------------------------------------

    def _gre_in(self, data: bytes, ihl: int, now: float) -> Verdict:
        dst = data[16:20]
        if dst != self.public_ip:
            return self._verdict(Action.ACCEPT, PassReason.NOT_OURS)
        if (data[6] << 8 | data[7]) & 0x3FFF:  # no GRE header to read in most of them
            return self._verdict(Action.DROP, DropReason.FRAGMENT)
        if len(data) < ihl + 8:
            raise ProtocolError(Malformed.SHORT_GRE, f"{len(data) - ihl} bytes after the IP header")
        f0, f1, proto, _plen, call_id = _GRE.unpack_from(data, ihl)
        if not is_pptp_gre(f0, f1, proto):
            return self._verdict(Action.ACCEPT, PassReason.NOT_PPTP_GRE)
        call = self.table.by_public.get((dst, data[12:16], call_id))
        if call is None or call.client_call_id is None:
            return self._verdict(Action.DROP, DropReason.NO_CALL)
        buf = bytearray(data)
        buf[16:20] = call.client_ip
        _U16.pack_into(buf, ihl + 6, call.client_call_id)
        _U16.pack_into(buf, 10, apply_delta((buf[10] << 8) | buf[11], call.in_csum_delta))
        call.last_seen = now
        call.gre_packets[1] += 1
        call.gre_bytes[1] += len(data)
        stats = self.stats
        stats.gre_packets[1] += 1
        stats.gre_bytes[1] += len(data)
        return Verdict(Action.ACCEPT, bytes(buf))

    def _gre_out(self, data: bytes, ihl: int, now: float) -> Verdict:
        if (data[6] << 8 | data[7]) & 0x3FFF:
            return self._verdict(Action.DROP, DropReason.FRAGMENT)
        if len(data) < ihl + 8:
            raise ProtocolError(Malformed.SHORT_GRE, f"{len(data) - ihl} bytes after the IP header")
        f0, f1, proto, _plen, call_id = _GRE.unpack_from(data, ihl)
        if not is_pptp_gre(f0, f1, proto):
            return self._verdict(Action.ACCEPT, PassReason.NOT_PPTP_GRE)
        call = self.table.by_server.get((data[12:16], data[16:20], call_id))
        if call is None:
            return self._verdict(Action.DROP, DropReason.NO_CALL)
        buf = bytearray(data)
        buf[12:16] = call.public_ip
        _U16.pack_into(buf, 10, apply_delta((buf[10] << 8) | buf[11], call.out_csum_delta))
        call.last_seen = now
        call.gre_packets[0] += 1
        call.gre_bytes[0] += len(data)
        stats = self.stats
        stats.gre_packets[0] += 1
        stats.gre_bytes[0] += len(data)
        return Verdict(Action.ACCEPT, bytes(buf))

    # -- GRE, the common case, for the queue worker's per-packet path ----------------------
    #
    # handle_packet decides every packet; these two decide only the packet that is the
    # whole point of a running call, and return None for anything else, which then goes
    # to handle_packet: a 20-byte IP header, no fragment, the IP total length equal to
    # the bytes, the usual enhanced GRE v1 headers, a live call that owns it. Their
    # bytes, counters and timers are exactly handle_packet's for that packet (a property
    # test holds them to it); only the Verdict and its checks in between are saved.

    def gre_in_fast(self, data: bytes, now: float) -> bytes | None:
        """Inbound GRE of a live call translated, or None: ask :meth:`handle_packet`.

        May raise IndexError on a short packet (the caller then asks handle_packet).
        """
        n = len(data)
        if (data[0] != 0x45 or data[9] != IPPROTO_GRE or data[6] & 0x3F or data[7]
                or data[20:24] not in _FAST_GRE or data[2] << 8 | data[3] != n):
            return None
        head, csum, src, dst, gre, call_id = _IN_HEAD.unpack_from(data)
        public = self.public_ip
        if dst != public:
            return None
        call = self.table.by_public.get((public, src, call_id))
        if call is None:
            return None
        cid = call.client_call_id
        if cid is None:
            return None
        c = (~csum & 0xFFFF) + call.in_csum_delta
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        call.last_seen = now
        call.gre_packets[1] += 1
        call.gre_bytes[1] += n
        stats = self.stats
        stats.gre_packets[1] += 1
        stats.gre_bytes[1] += n
        return _IN_HEAD.pack(head, ~c & 0xFFFF, src, call.client_ip, gre, cid) + data[28:]

    def gre_out_fast(self, data: bytes, now: float) -> bytes | None:
        """Outbound GRE of a live call translated, or None: ask :meth:`handle_packet`.

        May raise IndexError on a short packet (the caller then asks handle_packet).
        """
        n = len(data)
        if (data[0] != 0x45 or data[9] != IPPROTO_GRE or data[6] & 0x3F or data[7]
                or data[20:24] not in _FAST_GRE or data[2] << 8 | data[3] != n):
            return None
        head, csum, src, dst, _gre, call_id = _IN_HEAD.unpack_from(data)
        call = self.table.by_server.get((src, dst, call_id))
        if call is None:
            return None
        c = (~csum & 0xFFFF) + call.out_csum_delta
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        call.last_seen = now
        call.gre_packets[0] += 1
        call.gre_bytes[0] += n
        stats = self.stats
        stats.gre_packets[0] += 1
        stats.gre_bytes[0] += n
        return _OUT_HEAD.pack(head, ~c & 0xFFFF, call.public_ip) + data[16:]

    # -- TCP 1723 -------------------------------------------------------------------------

    def _tcp(self, data: bytes, ihl: int, total: int, d: Direction, now: float) -> Verdict:
        if total < ihl + 20:
            raise ProtocolError(Malformed.SHORT_TCP, f"{total - ihl} bytes after the IP header")
        sport, dport, seq = _TCP.unpack_from(data, ihl)
        doff = (data[ihl + 12] >> 4) * 4
        flags = data[ihl + 13]
        if doff < 20 or ihl + doff > total:
            raise ProtocolError(Malformed.BAD_TCP_HEADER, f"data offset {doff}")
        if d is OUT:
            if dport != PPTP_PORT:
                return ACCEPT
            key = (data[12:16], sport, data[16:20], dport)
        else:
            if sport != PPTP_PORT:
                return ACCEPT
            key = (data[16:20], dport, data[12:16], sport)
        start = ihl + doff
        payload = data[start:total]
        table = self.table
        conn = table.connections.get(key)
        if flags & TCP_SYN:
            stream_seq = (seq + 1) % SEQ_MOD
            if conn is not None and conn.streams[d].next_seq not in (None, stream_seq):
                table.close_connection(conn, ReleaseReason.RESET)  # the 4-tuple is reused
                conn = None
        if conn is None:
            if not (flags & TCP_SYN or payload) or flags & TCP_RST:
                return ACCEPT  # nothing to follow: a bare ACK/FIN/RST of no known connection
            denied = self.admission.connection_refusal(key[0], key[2])
            if denied is not None:
                if d is OUT and flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                    self.stats.connections_refused[denied] += 1
                    self.outbox.events.append(ConnectionRefused(
                        IPv4Address(key[0]), IPv4Address(key[2]), denied))
                return self._verdict(Action.DROP, denied.drop)
            # seen from its SYN: calls wait for Start-Control-Connection (_check_new_calls)
            conn = table.connection(key, now, create=True, started=not flags & TCP_SYN)
            if conn is None:
                return self._verdict(Action.DROP, table.connection_refusal(key[0])
                                     or DropReason.TOO_MANY_CONNECTIONS)
        conn.last_seen = now
        stream = conn.streams[d]
        if flags & TCP_SYN:
            stream.resync((seq + 1) % SEQ_MOD)
        new_data: bytes | None = None
        if payload:
            verdict_or_data = self._segment(conn, stream, d, data, start, seq, payload, now)
            if isinstance(verdict_or_data, Verdict):
                return verdict_or_data
            new_data = verdict_or_data
        if flags & TCP_RST:
            table.close_connection(conn, ReleaseReason.RESET)
        elif flags & TCP_FIN:
            conn.fin[d] = True
            table.end_calls(conn, ReleaseReason.FIN)
            if all(conn.fin):
                table.forget_connection(conn)
        return self._verdict(Action.ACCEPT, None, new_data)

    def _segment(self, conn: ControlConnection, stream: Stream, d: Direction, data: bytes,
                 start: int, seq: int, payload: bytes, now: float) -> Verdict | bytes | None:
        """Returns the packet's new bytes (None: unchanged), or a Verdict to return at once."""
        if stream.next_seq is None:
            try:
                parse_control_header(payload)
            except ProtocolError:
                return self._verdict(Action.ACCEPT, PassReason.UNSYNCED)
            stream.resync(seq)
        assert stream.next_seq is not None
        behind = (stream.next_seq - seq) % SEQ_MOD
        if behind >= SEQ_MOD // 2:
            return self._verdict(Action.DROP, DropReason.GAP)
        writes = stream.replay(seq, min(behind, len(payload)))
        if behind >= len(payload):  # all of it is a retransmission
            return _apply(data, start, writes) if writes else None
        new = payload[behind:]
        try:
            pieces, pending, header = frame(stream, new)
        except ProtocolError as exc:
            if self.policy.malformed is MalformedAction.PASS:
                stream.resync(None)
                return self._verdict(Action.ACCEPT, exc.reason, violation=exc)
            return self._verdict(Action.DROP, exc.reason, violation=exc)
        # each piece's Call ID field, looked up once for every use below
        fields = [CALL_ID_FIELDS.get((d, piece.header.message_type)) for piece in pieces]
        if d is OUT and self._names_a_foreign_call(conn, pieces, fields):
            return self._verdict(Action.DROP, DropReason.FOREIGN_CALL_ID)
        refused = self._check_new_calls(conn, d, pieces, fields, (seq + behind) % SEQ_MOD, now)
        if refused is not None:
            return self._verdict(Action.DROP, refused.drop)
        base = behind  # payload offset of the first new byte
        new_seq = (seq + behind) % SEQ_MOD
        for piece, field in zip(pieces, fields, strict=True):
            if field is not None:
                for off, value in self._rewrite(conn, stream, d, piece, field,
                                                (new_seq + piece.at - piece.start) % SEQ_MOD,
                                                now):
                    pos = base + piece.at + off - piece.start
                    if payload[pos] != value:
                        writes.append((pos, value))
                        stream.record((new_seq + piece.at + off - piece.start) % SEQ_MOD, value)
            if piece.complete:
                self._complete(conn, stream, d, piece, field,
                               (new_seq + piece.at - piece.start) % SEQ_MOD, now)
        stream.pending, stream.header = pending, header
        stream.next_seq = (seq + len(payload)) % SEQ_MOD
        return _apply(data, start, writes) if writes else None

    def _check_new_calls(self, conn: ControlConnection, d: Direction, pieces: list[Piece],
                         fields: list[CallIdField | None], seq: int,
                         now: float) -> Refusal | None:
        """Why the new calls of a segment whose new bytes start at ``seq`` are refused."""
        client_his = []
        started = conn.started
        for piece, field in zip(pieces, fields, strict=True):
            if (piece.header.message_type is _START_REQUEST and piece.complete):
                started = True  # (a client may send its first call in the same segment)
            if (field is not None and field.kind is _NEW
                    and piece.start <= field.offset < piece.end):
                client_his.append(piece.message[field.offset])
        if not client_his:
            return None
        n = len(client_his)
        admission = self.admission
        reason = ((None if started else Refusal.NOT_STARTED)
                  or admission.acl_refusal(conn.client_ip, conn.server_ip)
                  or self.table.refusal(conn, self.public_ip, client_his)
                  or admission.rate_refusal(conn.client_ip, n, now))
        if reason is None:
            admission.admit(conn.client_ip, n, now)
            return None
        if conn.refused_at[d] != seq:  # not a retransmission of a request refused already
            conn.refused_at[d] = seq
            self.stats.calls_refused[reason] += 1
            self.outbox.events.append(CallRefused(
                IPv4Address(conn.client_ip), None, IPv4Address(conn.server_ip), reason))
        return reason

    def _names_a_foreign_call(self, conn: ControlConnection, pieces: list[Piece],
                              fields: list[CallIdField | None]) -> bool:
        """Whether an outbound message names, as its own, a Call ID that is no call of
        ``conn`` but the live public Call ID of another connection's call to the same
        server (client A's Call-Clear-Request for a Call ID the server knows as client
        B's). Passing it untouched would let the server match it to B's call; only a
        field whose two bytes are both in this segment can be checked."""
        new_ids: set[int] = set()
        for piece, field in zip(pieces, fields, strict=True):
            if field is None or not piece.start <= field.offset < field.offset + 1 < piece.end:
                continue
            f, kind = field.offset, field.kind
            value = piece.message[f] << 8 | piece.message[f + 1]
            if kind is _NEW:
                new_ids.add(value)
            elif (kind is _OWN and value not in new_ids
                  and conn.call_by_client_id(value) is None):
                other = self.table.by_public.get((self.public_ip, conn.server_ip, value))
                if other is not None and other.conn is not conn:
                    return True
        return False

    # -- Call ID fields ----------------------------------------------------------------------

    def _rewrite(self, conn: ControlConnection, stream: Stream, d: Direction, piece: Piece,
                 field: CallIdField, message_seq: int, now: float) -> list[tuple[int, int]]:
        """(message offset, byte) pairs to write for the field this piece carries; the
        call the field names is found here, once, for :meth:`_complete` (the message is
        known by the sequence number of its first byte, ``message_seq``)."""
        f, kind = field.offset, field.kind
        has_hi = piece.start <= f < piece.end
        has_lo = piece.start <= f + 1 < piece.end
        if not (has_hi or has_lo):
            return []
        msg = piece.message
        hi = msg[f]
        full = (hi << 8 | msg[f + 1]) if f + 1 < piece.end else None
        out: list[tuple[int, int]] = []
        if kind is _NEW:
            call = stream.partial.pop(f, None) if not has_hi else self._new_call(conn, hi, now)
            if not isinstance(call, Call):
                return []
            stream.new_call = call
            if has_hi:
                out.append((f, call.public_call_id >> 8))
            if full is not None:
                self._set_client_call_id(conn, call, full)
                out.append((f + 1, call.public_call_id & 0xFF))
            else:
                stream.partial[f] = call
        elif full is None:  # only the high byte is here: the one-to-one rule decides it
            if kind is _SERVER:
                return []
            new_hi = self._decide_hi(conn, kind, hi)
            stream.partial[f] = hi if new_hi is None else new_hi  # the byte that went out
            if new_hi is not None:
                out.append((f, new_hi))
        else:
            sent_hi = stream.partial.pop(f, None)
            named, value = self._decide(conn, kind, full)
            stream.partial[_NAMED] = (message_seq, named)
            if named is None:  # names no call of this connection: goes out as it came
                if kind is not _SERVER:
                    self.stats.verdicts[("accept", PassReason.UNKNOWN_CALL_ID)] += 1
            elif value is not None:
                if has_hi:
                    out.append((f, value >> 8))
                    out.append((f + 1, value & 0xFF))
                elif value >> 8 == sent_hi:
                    out.append((f + 1, value & 0xFF))
                else:  # the high byte could not be decided alone: leave the field be
                    self.stats.verdicts[("accept", PassReason.SPLIT_CALL_ID_UNDECIDED)] += 1
        if out:
            self.stats.rewrites[(_MT_NAMES[piece.header.message_type], kind.value)] += 1
        return out

    def _new_call(self, conn: ControlConnection, client_hi: int, now: float) -> Call | None:
        return self.table.allocate(conn, client_hi, self.public_ip, now)

    def _set_client_call_id(self, conn: ControlConnection, call: Call, call_id: int) -> None:
        old = conn.call_by_client_id(call_id)
        if old is not None and old is not call:
            self.table.release(old, ReleaseReason.REPLACED)  # the client reused a live Call ID
        call.client_call_id = call_id

    def _decide(self, conn: ControlConnection, kind: FieldKind,
                value: int) -> tuple[Call | None, int | None]:
        """(the call of ``conn`` that ``value`` names or None, the value to write or None).

        Every lookup is within the one control connection: a message can name
        only its own connection's calls, never another client's.
        """
        if kind is _OWN:
            call = conn.call_by_client_id(value)
            return call, None if call is None else call.public_call_id
        if kind is _PEER:
            call = conn.call_by_public_id(value)
            return call, None if call is None else call.client_call_id
        if kind is _SERVER:
            return conn.call_by_server_id(value), None
        return self._decide_disconnect(conn, value)

    def _decide_disconnect(self, conn: ControlConnection,
                           value: int) -> tuple[Call | None, int | None]:
        """The call an inbound Call-Disconnect-Notify names, and the Call ID to write.

        RFC 2637 puts the PAC's own Call ID there; some PACs put the PNS's
        (that is, our public) Call ID; and the PNS we know best (pptp-linux)
        looks the value up in its *own* call table. natedit matches the value
        against the server's Call IDs of this connection first, then against
        its public Call IDs. With ``disconnect_rule: client`` (default) it
        writes the matched call's client Call ID, as nf_nat_pptp does, so any
        PNS finds its call; with ``rfc`` it leaves a server Call ID untouched
        and only maps a public Call ID back to the client's.
        """
        call = conn.call_by_server_id(value)
        if call is not None:
            if self.policy.disconnect_rule is DisconnectRule.RFC:
                return call, None
            return call, call.client_call_id
        call = conn.call_by_public_id(value)
        return call, None if call is None else call.client_call_id

    def _decide_hi(self, conn: ControlConnection, kind: FieldKind, hi: int) -> int | None:
        if kind is _OWN:
            return conn.public_hi_for_client_hi(hi)
        if kind is _PEER:
            return conn.client_hi_for_public_hi(hi)
        # Disconnect: the value may be a server or a public Call ID. Each candidate
        # call says what the high byte becomes; write it only when they all agree.
        rfc = self.policy.disconnect_rule is DisconnectRule.RFC
        his = {hi if rfc else c.client_call_hi for c in conn.calls
               if c.server_call_id is not None and c.server_call_id >> 8 == hi}
        his |= {c.client_call_hi for c in conn.calls if c.public_call_id >> 8 == hi}
        return his.pop() if len(his) == 1 else None

    # -- message semantics ------------------------------------------------------------------

    def _complete(self, conn: ControlConnection, stream: Stream, d: Direction, piece: Piece,
                  field: CallIdField | None, message_seq: int, now: float) -> None:
        """Apply a whole message (original bytes) to the call it names, through the
        lifecycle table (:data:`natedit.core.calls.TRANSITIONS`)."""
        mt = piece.header.message_type
        self.stats.messages[(_DIRECTION_NAMES[d], _MT_NAMES[mt])] += 1
        new_call = stream.new_call
        stream.new_call = None
        named = stream.partial.get(_NAMED)
        stream.partial.clear()
        if mt is _START_REQUEST:
            conn.started = True
            return
        if mt in _STOPS:
            for each in list(conn.calls):
                self.table.apply(each, d, mt, Outcome.ANY, now)
            return
        new = isinstance(new_call, Call)
        call: Call | None
        if isinstance(new_call, Call):
            call = new_call
        elif isinstance(named, tuple) and named[0] == message_seq:
            call = named[1]
        else:
            return
        if call is None or call.released or field is None:
            return
        msg = piece.message
        at = RESULT_CODE_OFFSET.get(mt)
        outcome = (Outcome.ANY if at is None
                   else Outcome.CONNECTED if msg[at] == RESULT_CONNECTED else Outcome.REFUSED)
        server_at = field.server_call_id_at
        server_call_id = None if server_at is None else msg[server_at] << 8 | msg[server_at + 1]
        if not self.table.apply(call, d, mt, outcome, now, server_call_id, new):
            self.stats.verdicts[("accept", PassReason.UNEXPECTED_MESSAGE)] += 1


def _apply(data: bytes, start: int, writes: list[tuple[int, int]]) -> bytes:
    """``data`` with payload bytes replaced, TCP checksum updated per RFC 1624."""
    buf = bytearray(data)
    ihl = (buf[0] & 0x0F) * 4
    delta = 0
    for pos, value in writes:
        old = buf[start + pos]
        if old == value:
            continue
        buf[start + pos] = value
        # Payload starts on an even offset of the checksummed data (the TCP header
        # is a multiple of 4 bytes), so even payload offsets are high bytes.
        if pos % 2 == 0:
            delta += (~(old << 8) & 0xFFFF) + (value << 8)
        else:
            delta += (~old & 0xFFFF) + value
    at = ihl + 16
    _U16.pack_into(buf, at, apply_delta((buf[at] << 8) | buf[at + 1], delta))
    return bytes(buf)
