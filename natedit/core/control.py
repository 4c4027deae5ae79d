"""TCP 1723: control connections, their segments, and the messages they carry.

Theory of operation
-------------------
Every rewrite keeps the length, so TCP sequence numbers never move; the TCP
checksum is adjusted incrementally (RFC 1624). Control messages are framed
by their Length field across segments (:mod:`natedit.core.stream`); a segment
is first framed without side effects, then, if it is let through, its Call ID
fields are rewritten (:mod:`natedit.core.fields`) and each message that
completes is applied to the call it names through the lifecycle table
(:data:`natedit.core.calls.TRANSITIONS`, by :meth:`CallTable.apply`).

Hostile and confused control traffic. Headers are validated before any
read (``wire.parse_control_header``: at least 12 bytes, PPTP message type 1,
magic cookie, control type 1..15, then Length equal to that type's exact
size), so Length 0, below 12, below or above the type's size and huge all
end as ``bad_length`` before a byte of the body is trusted; a Length beyond
the bytes that came is a message that continues in the next segment. A
Call-Clear-Request, a reply or a Call-Disconnect-Notify for a call that does
not exist or is another client's changes nothing in the table and goes out
as it came (``unknown_call_id``), unless letting it out would name another
client's call to the server (``foreign_call_id``). A second
Outgoing-Call-Request reusing a live Call ID of the same connection replaces
that call (released as ``replaced``). A connection natedit saw from its SYN
may set up calls only after a Start-Control-Connection-Request
(``refused:not_started``); one picked up mid-stream or restored after a
restart is taken as started.

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

Public addresses. A connection's calls get the address the connection was
NATed to: the edge reads it (from conntrack: the packets here are queued before
the SNAT and after the un-NAT, so they do not show it) and passes it with the
segment (``public``); the first call of the connection pins it (the policy's
first public address while the edge has told none: ``natedit replay``). A
connection NATed to none of the policy's public addresses (nor NATed at all)
gets its new calls refused (``refused:not_public``): never mapped to a wrong
address. When the address changes under a connection with calls (an uplink
failover), its calls end (``public_address_changed``).
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from .admission import Admission
from .calls import Call, Outcome
from .checksum import apply_delta
from .errors import DropReason, Malformed, PassReason, ProtocolError, Refusal, ReleaseReason
from .events import ACCEPT, Action, CallRefused, ConnectionRefused, Verdict
from .fields import NAMED, CallIdFields
from .policy import MalformedAction
from .stats import Outbox
from .stream import SEQ_MOD, Piece, Stream, frame
from .table import CallTable, ControlConnection
from .wire import (
    CALL_ID_FIELDS,
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
    parse_control_header,
)

MT = MessageType
OUT = Direction.OUTBOUND
_U16 = struct.Struct("!H")
_TCP = struct.Struct("!HHI")
_ACK = struct.Struct("!I")
_NEW, _OWN = FieldKind.NEW, FieldKind.OWN
_START_REQUEST = MT.START_CONTROL_CONNECTION_REQUEST
_STOPS = (MT.STOP_CONTROL_CONNECTION_REQUEST, MT.STOP_CONTROL_CONNECTION_REPLY)
_DIRECTION_NAMES = tuple(d.name.lower() for d in Direction)
_MT_NAMES = {mt: mt.name for mt in MessageType}


class Control:
    """The TCP 1723 conversations of the calls in ``table``."""

    def __init__(self, table: CallTable, admission: Admission, outbox: Outbox,
                 publics: tuple[bytes, ...]) -> None:
        self.table = table
        self.admission = admission
        self.outbox = outbox
        self.stats = outbox.stats
        self.public_ip = publics[0]
        """The address a connection's calls get while the edge has told none."""
        self.publics = frozenset(publics)
        self.fields = CallIdFields(table, outbox.stats, self.public_ip)

    def handle(self, data: bytes, ihl: int, total: int, d: Direction, now: float,
               public: bytes | None = None) -> Verdict:
        """``public``: the address the edge found the segment's connection NATed to (None:
        it cannot say; the connection keeps the one it has)."""
        if data[6] & 0x3F or data[7]:  # MF or an offset: an IP fragment (RFC 791)
            return self._fragment(data, ihl, total)
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
            if conn is not None:
                if conn.streams[d].syn_seq == stream_seq:
                    # the SYN (SYN-ACK) this stream began with, again: late or duplicated
                    conn.last_seen = now
                    return self.outbox.verdict(Action.ACCEPT, PassReason.DUPLICATE_SYN)
                if conn.streams[d].next_seq not in (None, stream_seq):
                    table.close_connection(conn, ReleaseReason.RESET)  # the 4-tuple is reused
                    conn = None
        if conn is None:
            if not (flags & TCP_SYN or payload) or flags & TCP_RST:
                return ACCEPT  # nothing to follow: a bare ACK/FIN/RST of no known connection
            if key[0] not in self.publics and not table.policy.is_inside(IPv4Address(key[0])):
                # the gateway's own client on an address that is none of the public ones
                # (its own calls are natedit's only from a public address)
                return self.outbox.verdict(Action.ACCEPT, PassReason.NOT_OURS)
            denied = self.admission.connection_refusal(key[0], key[2],
                                                       gateway=key[0] in self.publics)
            if denied is not None:
                if d is OUT and flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                    self.stats.connections_refused[denied] += 1
                    self.outbox.events.append(ConnectionRefused(
                        IPv4Address(key[0]), IPv4Address(key[2]), denied))
                return self.outbox.verdict(Action.DROP, denied.drop)
            # seen from its SYN: calls wait for Start-Control-Connection (_check_new_calls)
            conn = table.connection(key, now, create=True, started=not flags & TCP_SYN)
            if conn is None:
                return self.outbox.verdict(Action.DROP, table.connection_refusal(key[0])
                                     or DropReason.TOO_MANY_CONNECTIONS)
        conn.last_seen = now
        if key[0] in self.publics:  # the gateway's own client: its address is its public one
            public = key[0]
        if public is not None and public != conn.public_ip:
            if conn.calls:  # NATed elsewhere now (uplink failover): the calls are wrong
                table.end_calls(conn, ReleaseReason.PUBLIC_ADDRESS_CHANGED)
            conn.public_ip = public
        stream = conn.streams[d]
        if flags & TCP_ACK:
            conn.streams[1 - d].acknowledge(_ACK.unpack_from(data, ihl + 8)[0])
        if flags & TCP_SYN:
            stream.resync((seq + 1) % SEQ_MOD)
            stream.syn_seq = stream.next_seq
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
        return self.outbox.verdict(Action.ACCEPT, None, new_data)

    def _fragment(self, data: bytes, ihl: int, total: int) -> Verdict:
        """An IP fragment of TCP. The kernel defragments before the queue (conntrack),
        so a fragment reaches the core only without it (``natedit replay``, or no
        defragmentation loaded): it is never read as a whole segment. The first
        fragment names the ports: one of TCP 1723 is dropped (``fragment``), so its
        datagram never reassembles and no control byte goes out uninspected; a later
        fragment carries no ports, cannot be told to be PPTP and goes on as it came
        (``not_ours``: without its first fragment it is nothing). No connection
        changes: the next segment is decided as if the fragments never came."""
        if data[6] & 0x1F or data[7]:  # an offset: not the first fragment
            return self.outbox.verdict(Action.ACCEPT, PassReason.NOT_OURS)
        if total < ihl + 4:
            raise ProtocolError(Malformed.SHORT_TCP, f"{total - ihl} bytes after the IP header")
        sport, dport = struct.unpack_from("!HH", data, ihl)
        if PPTP_PORT not in (sport, dport):
            return ACCEPT
        return self.outbox.verdict(Action.DROP, DropReason.FRAGMENT)

    def _segment(self, conn: ControlConnection, stream: Stream, d: Direction, data: bytes,
                 start: int, seq: int, payload: bytes, now: float) -> Verdict | bytes | None:
        """Returns the packet's new bytes (None: unchanged), or a Verdict to return at once."""
        if stream.next_seq is None:
            try:
                parse_control_header(payload)
            except ProtocolError:
                return self.outbox.verdict(Action.ACCEPT, PassReason.UNSYNCED)
            stream.resync(seq)
        assert stream.next_seq is not None
        behind = (stream.next_seq - seq) % SEQ_MOD
        if behind >= SEQ_MOD // 2:
            return self.outbox.verdict(Action.DROP, DropReason.GAP)
        if behind and not stream.history_check(payload[:behind], behind):
            return self.outbox.verdict(Action.DROP, DropReason.HISTORY_REWRITTEN)
        writes = stream.replay(seq, min(behind, len(payload))) if behind else []
        if behind >= len(payload):  # all of it is a retransmission
            return _apply(data, start, writes) if writes else None
        new = payload[behind:]
        try:
            pieces, pending, header = frame(stream, new)
        except ProtocolError as exc:
            if self.table.policy.malformed is MalformedAction.PASS:
                stream.resync(None)
                return self.outbox.verdict(Action.ACCEPT, exc.reason, violation=exc)
            return self.outbox.verdict(Action.DROP, exc.reason, violation=exc)
        # each piece's Call ID field, looked up once for every use below
        fields = [CALL_ID_FIELDS.get((d, piece.header.message_type)) for piece in pieces]
        new_seq = (seq + behind) % SEQ_MOD
        if pieces and pieces[0].start:  # the rest of a message: a field cut in two?
            split = self.fields.split_refusal(conn, stream, d, pieces[0], fields[0])
            if split is not None:
                return self.outbox.verdict(Action.DROP, split)
        if d is OUT:  # (only outbound messages name their sender's calls, or make new ones)
            if self._names_a_foreign_call(conn, pieces, fields):
                return self.outbox.verdict(Action.DROP, DropReason.FOREIGN_CALL_ID)
            refused = self._check_new_calls(conn, d, pieces, fields, new_seq, now)
            if refused is not None:
                return self.outbox.verdict(Action.DROP, refused.drop)
        rewrite = self.fields.rewrite
        for piece, field in zip(pieces, fields, strict=True):
            # payload offset and sequence number of message offset 0
            at = behind + piece.at - piece.start
            message_seq = (new_seq + piece.at - piece.start) % SEQ_MOD
            if field is not None:
                for off, value in rewrite(conn, stream, d, piece, field, message_seq, now):
                    if payload[at + off] != value:
                        writes.append((at + off, value))
                        stream.record((message_seq + off) % SEQ_MOD, value)
            if len(piece.message) == piece.header.length:  # complete
                self._complete(conn, stream, d, piece, field, message_seq, now)
        stream.pending, stream.header = pending, header
        stream.next_seq = (seq + len(payload)) % SEQ_MOD
        stream.inspect(new)
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
                    and piece.start <= field.offset < len(piece.message)):
                client_his.append(piece.message[field.offset])
        if not client_his:
            return None
        n = len(client_his)
        admission = self.admission
        public = conn.public_ip = conn.public_or(self.public_ip)  # pinned from now on
        reason = ((None if started else Refusal.NOT_STARTED)
                  or (None if public in self.publics else Refusal.NOT_PUBLIC)
                  or admission.acl_refusal(conn.client_ip, conn.server_ip,
                                           gateway=conn.client_ip in self.publics)
                  or self.table.refusal(conn, public, client_his)
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
            if (field is None
                    or not piece.start <= field.offset < field.offset + 1 < len(piece.message)):
                continue
            f, kind = field.offset, field.kind
            value = piece.message[f] << 8 | piece.message[f + 1]
            if kind is _NEW:
                new_ids.add(value)
            elif (kind is _OWN and value not in new_ids
                  and conn.call_by_client_id(value) is None):
                public = conn.public_or(self.public_ip)
                other = self.table.by_public.get((public, conn.server_ip, value))
                if other is not None and other.conn is not conn:
                    return True
        return False

    # -- message semantics ------------------------------------------------------------------

    def _complete(self, conn: ControlConnection, stream: Stream, d: Direction, piece: Piece,
                  field: CallIdField | None, message_seq: int, now: float) -> None:
        """Apply a whole message (original bytes) to the call it names, through the
        lifecycle table (:data:`natedit.core.calls.TRANSITIONS`)."""
        mt = piece.header.message_type
        self.stats.messages[(_DIRECTION_NAMES[d], _MT_NAMES[mt])] += 1
        new_call = stream.new_call
        stream.new_call = None
        named = stream.partial.get(NAMED)
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
