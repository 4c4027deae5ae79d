"""Call ID fields of control messages: which call a field names, and what to write.

Theory of operation
-------------------
Every Call ID that an *outbound* message carries as the sender's own goes
private -> public (Outgoing-Call-Request, Incoming-Call-Reply,
Call-Clear-Request, ...), and every Peer's Call ID an *inbound* message
carries goes public -> private (Outgoing-Call-Reply, Incoming-Call-Connected,
WAN-Error-Notify, Set-Link-Info): :data:`natedit.core.wire.CALL_ID_FIELDS` is
that table, one field per (direction, message type). Call-Disconnect-Notify is
the odd one (:meth:`CallIdFields._decide_disconnect`); a server's
Call-Clear-Request is only read, by the server's Call ID.

Every Call ID is looked up in *its own control connection* only: a message
can name only its own connection's calls, never another client's. A field
that names none goes out as it came (``unknown_call_id``).

Split fields. A field may be cut between two TCP segments, and its first byte
must leave before the second is seen: the table's allocator keeps client and
public *high bytes* one-to-one per connection, so that one byte is enough
(:meth:`CallIdFields._decide_hi`); when the candidates disagree (a
Call-Disconnect-Notify, or a connection whose calls broke the rule: the
allocator relaxes it rather than refuse a call) the first byte leaves as it
came, and so does an inbound field (``split_call_id_undecided``); an outbound
one naming a call is dropped, as a private Call ID must not leave.
``Stream.partial`` remembers what was decided for the first byte. A field never
leaves half-rewritten: when
the whole value asks for another high byte than the one that left, the segment
with the rest is dropped (``split_call_id``, :meth:`CallIdFields.split_refusal`).

The call a field names is found once, when its field is read, and kept in
``Stream.partial`` under :data:`NAMED` with the sequence number of the
message's first byte, for the message's completion (:mod:`natedit.core.control`).
"""

from __future__ import annotations

from .calls import Call
from .errors import DropReason, PassReason, ReleaseReason
from .policy import DisconnectRule
from .stats import Stats
from .stream import Piece, Stream
from .table import SERVER_HI, CallTable, ControlConnection
from .wire import CallIdField, Direction, FieldKind, MessageType

_NEW, _OWN, _PEER, _SERVER = FieldKind.NEW, FieldKind.OWN, FieldKind.PEER, FieldKind.SERVER
_MT_NAMES = {mt: mt.name for mt in MessageType}
_KIND_NAMES = {kind: kind.value for kind in FieldKind}

NAMED = -1
"""The key of ``Stream.partial`` (the stream's scratch for the message in progress,
cleared when it completes or the stream resynchronises) under which the call the
message's Call ID field named is kept, with the message's first sequence number."""

DECIDED = -2
"""The key of ``Stream.partial`` under which :meth:`CallIdFields.split_refusal` keeps
what it found for the second half of a split field, for :meth:`CallIdFields.rewrite`."""


class CallIdFields:
    """Reads and rewrites the Call ID fields of the control connections of ``table``."""

    def __init__(self, table: CallTable, stats: Stats, public_ip: bytes) -> None:
        self.table = table
        self.stats = stats
        self.public_ip = public_ip
        """A connection's address while it has none of its own (``conn.public_ip``)."""

    def rewrite(self, conn: ControlConnection, stream: Stream, d: Direction, piece: Piece,
                 field: CallIdField, message_seq: int, now: float) -> list[tuple[int, int]]:
        """(message offset, byte) pairs to write for the field this piece carries; the
        call the field names is found here, once, for the message's completion (the
        message is known by the sequence number of its first byte, ``message_seq``)."""
        f, kind = field.offset, field.kind
        msg = piece.message
        end = len(msg)
        has_hi = piece.start <= f < end
        has_lo = piece.start <= f + 1 < end
        if not (has_hi or has_lo):
            return []
        hi = msg[f]
        full = (hi << 8 | msg[f + 1]) if f + 1 < end else None
        out: list[tuple[int, int]] = []
        if kind is _NEW:
            public = conn.public_or(self.public_ip)
            call = (self.table.allocate(conn, hi, public, now) if has_hi
                    else stream.partial.pop(f, None))
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
            decided = stream.partial.pop(DECIDED, None)
            if isinstance(decided, tuple) and decided[0] == f:
                named, value = decided[1], decided[2]
            else:
                named, value = self._decide(conn, kind, full)
            stream.partial[NAMED] = (message_seq, named)
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
            self.stats.rewrites[(_MT_NAMES[piece.header.message_type], _KIND_NAMES[kind])] += 1
        return out

    def split_refusal(self, conn: ControlConnection, stream: Stream, d: Direction,
                      piece: Piece, field: CallIdField | None) -> DropReason | None:
        """Why the segment carrying the rest of a Call ID field whose first byte has
        left already must be dropped, before anything of it is applied.

        A field leaves whole: either as it came or as decided from its whole value,
        never half-rewritten. The first byte went out as :meth:`_decide_hi` said; if
        the whole value now asks for another high byte (a value naming no call of
        the connection but sharing a high byte with one), the rest is refused
        (``split_call_id``), every time it is sent; so it is when an outbound field
        names a call but its first byte left as it came (the connection's calls
        broke the high-byte rule: :mod:`natedit.core.allocator`), which would let
        the call's private Call ID out. A field that leaves as it came gets the
        foreign check of whole fields (``foreign_call_id``).
        """
        stream.partial.pop(DECIDED, None)
        if field is None or field.kind is _NEW or field.kind is _SERVER:
            return None
        f, msg = field.offset, piece.message
        if not (f < piece.start <= f + 1 < len(msg)):
            return None  # not the second half of a split field
        sent_hi = stream.partial.get(f)
        if not isinstance(sent_hi, int):
            return None
        full = msg[f] << 8 | msg[f + 1]
        named, value = self._decide(conn, field.kind, full)
        stream.partial[DECIDED] = (f, named, value)  # (for :meth:`rewrite`: found once)
        leaving = value if value is not None and value >> 8 == sent_hi else (
            sent_hi << 8 | msg[f + 1])
        if leaving != full and leaving != value:
            return DropReason.SPLIT_CALL_ID
        if d is Direction.OUTBOUND and value is not None and leaving != value:
            return DropReason.SPLIT_CALL_ID  # a live call's private Call ID would leave
        if d is Direction.OUTBOUND and field.kind is _OWN and named is None:
            public = conn.public_or(self.public_ip)
            other = self.table.by_public.get((public, conn.server_ip, full))
            if other is not None and other.conn is not conn:
                return DropReason.FOREIGN_CALL_ID
        return None

    def _set_client_call_id(self, conn: ControlConnection, call: Call, call_id: int) -> None:
        old = conn.call_by_client_id(call_id)
        if old is not None and old is not call:
            self.table.release(old, ReleaseReason.REPLACED)  # the client reused a live Call ID
        conn.set_ids(call, client_call_id=call_id)

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
            if self.table.policy.disconnect_rule is DisconnectRule.RFC:
                return call, None
            return call, call.client_call_id
        call = conn.call_by_public_id(value)
        return call, None if call is None else call.client_call_id

    def _decide_hi(self, conn: ControlConnection, kind: FieldKind, hi: int) -> int | None:
        """The byte to write for the high byte ``hi`` of a field seen alone, or None
        (it leaves as it came): what every call of ``conn`` it may name agrees on
        (one call under the high-byte rule; maybe several once the rule was relaxed)."""
        if kind is _OWN:
            his = conn.public_his_for_client_hi(hi)
            return his.pop() if len(his) == 1 else None
        if kind is _PEER:
            his = conn.client_his_for_public_hi(hi)
            return his.pop() if len(his) == 1 else None
        # Disconnect: the value may be a server or a public Call ID. Each candidate
        # call says what the high byte becomes; write it only when they all agree.
        rfc = self.table.policy.disconnect_rule is DisconnectRule.RFC
        his = {hi if rfc else c.client_call_hi for c in conn.calls_with(SERVER_HI | hi)}
        his |= conn.client_his_for_public_hi(hi)
        return his.pop() if len(his) == 1 else None
