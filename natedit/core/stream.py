"""One direction of a control connection as a byte stream: framing and replay.

PPTP control messages ride TCP, so a segment may carry several messages, part
of one, or the tail of one and the head of the next. A :class:`Stream`
follows the sequence space of one direction: ``next_seq`` is the first byte
not yet seen, ``pending`` holds the bytes of the message that is not complete
yet (at most 220: the longest message; an invalid header is rejected before
its Length is trusted), and ``edits`` remembers every byte natedit wrote into
data it already let through, so a retransmission gets exactly the same
rewrite as the original. That memory is the only thing a peer can make grow
by talking, so it is bounded and compact: at most :data:`EDIT_BACKLOG`
bytes, 8 bytes each (``seq << 8 | byte`` in an ``array``), about 5 KiB per
stream at worst.

:func:`frame` reads the new bytes of a segment *without* changing the stream:
the translator commits only once it has decided to let the segment through.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from .wire import CONTROL_HEADER_LEN, ControlHeader, parse_control_header

SEQ_MOD = 1 << 32
EDIT_WINDOW = 1 << 20
"""How far behind ``next_seq`` a recorded edit is kept: beyond any TCP window
a PPTP peer uses (PPTP moves a few hundred bytes a minute)."""
EDIT_BACKLOG = 512
"""Most bytes remembered for retransmissions (two per rewritten Call ID): 256
rewritten Call IDs in flight, far beyond what a PPTP peer leaves unacknowledged
(one message, or a few, at a time), and small enough that a client sending
nothing but Call IDs to rewrite holds only a few KiB per connection."""
HISTORY_BYTES = 1024
"""Most unacknowledged bytes kept as inspected, per direction: far beyond what a PPTP
peer leaves unacknowledged (a message or a few, each at most 220 bytes), and 1 KiB
at worst per stream; a peer that leaves more unacknowledged and retransmits the
oldest gets it dropped (``history_rewritten``) rather than let out unchecked."""
_COMPACT_AT = EDIT_BACKLOG // 4
"""Forgotten entries at the head of the array before it is compacted."""


class Stream:
    __slots__ = ("_edits", "_head", "acked", "header", "inspected", "new_call", "next_seq",
                 "partial", "pending", "syn_seq")

    def __init__(self) -> None:
        self.next_seq: int | None = None
        """Sequence number of the next byte in order; None until synchronised."""
        self.syn_seq: int | None = None
        """The sequence number after the SYN (SYN-ACK) this stream began with, if seen: a
        SYN carrying it again is a duplicate, not a new connection on the 4-tuple."""
        self.pending = b""
        """The bytes of the current, incomplete message."""
        self.header: ControlHeader | None = None
        """The header of ``pending`` once its 12 bytes are in."""
        self.partial: dict[int, object] = {}
        """Field offset -> what was decided for a field whose first byte went out."""
        self.new_call: object = None
        """The call the current message created, until the message completes."""
        self._edits = array("Q")
        """``seq << 8 | byte`` of rewritten bytes already forwarded, from ``_head`` on."""
        self._head = 0

        self.inspected = bytearray()
        """The bytes as they came (before natedit's edits) of ``[next_seq - len, next_seq)``
        that the receiver has not acknowledged: a retransmission of them must repeat
        them (:meth:`history_check`)."""
        self.acked: int | None = None
        """Bytes before this are acknowledged by the receiver (or came before natedit
        synchronised): a retransmission of them is discarded by the receiver."""

    def resync(self, next_seq: int | None) -> None:
        self.next_seq = next_seq
        self.inspected = bytearray()
        self.acked = next_seq
        self.pending = b""
        self.header = None
        self.partial.clear()
        self.new_call = None

    def inspect(self, data: bytes) -> None:
        """``data``, the new in-order bytes just let through, as they came."""
        kept = self.inspected
        kept += data
        if len(kept) > HISTORY_BYTES:
            del kept[: len(kept) - HISTORY_BYTES]

    def acknowledge(self, ack: int) -> None:
        """The receiver acknowledged every byte before ``ack``."""
        if self.next_seq is None or self.acked is None:
            return
        ahead = (ack - self.acked) % SEQ_MOD
        if not ahead or ahead > (self.next_seq - self.acked) % SEQ_MOD:
            return  # old, or beyond what was sent: nothing learnt
        self.acked = ack
        unacked = (self.next_seq - ack) % SEQ_MOD
        if len(self.inspected) > unacked:
            del self.inspected[: len(self.inspected) - unacked]

    def history_check(self, old: bytes, behind: int) -> bool:
        """Whether ``old``, the retransmitted bytes of a segment whose first byte is
        ``behind`` bytes before ``next_seq``, repeat what was inspected. Bytes the
        receiver acknowledged (or that came before natedit synchronised) are discarded
        by it whatever they hold; bytes it has not acknowledged must be the same, and
        any that are no longer kept cannot be checked: both fail."""
        if self.next_seq is None or self.acked is None:
            return True
        kept = self.inspected
        unacked = (self.next_seq - self.acked) % SEQ_MOD
        first = max(0, behind - unacked)  # offsets before it: acknowledged
        if first >= len(old):
            return True
        if behind - first > len(kept):
            return False  # unacknowledged bytes no longer kept
        at = len(kept) - (behind - first)
        return kept[at : at + len(old) - first] == old[first:]

    @property
    def edits(self) -> list[tuple[int, int]]:
        """(sequence number, byte written) of rewritten bytes already forwarded."""
        return [(e >> 8, e & 0xFF) for e in self._edits[self._head :]]

    def record(self, seq: int, value: int) -> None:
        edits = self._edits
        edits.append(seq << 8 | value)
        n = len(edits)
        head = max(self._head, n - EDIT_BACKLOG)
        while head < n and (seq - (edits[head] >> 8)) % SEQ_MOD > EDIT_WINDOW:
            head += 1
        if head >= _COMPACT_AT:
            del edits[:head]
            head = 0
        self._head = head

    def replay(self, seq: int, length: int) -> list[tuple[int, int]]:
        """(payload offset, byte) of recorded edits that fall in ``[seq, seq + length)``."""
        out = []
        edits = self._edits
        for i in range(self._head, len(edits)):
            e = edits[i]
            off = ((e >> 8) - seq) % SEQ_MOD
            if off < length:
                out.append((off, e & 0xFF))
        return out


@dataclass(slots=True)
class Piece:
    """The part of one message that one segment carries."""

    header: ControlHeader
    message: bytes
    """Every byte of the message known once this segment is read (from offset 0)."""
    start: int
    """First message offset in this segment."""
    at: int
    """Payload offset of message offset ``start``."""

    @property
    def end(self) -> int:
        return len(self.message)

    @property
    def complete(self) -> bool:
        return len(self.message) == self.header.length


def frame(stream: Stream, data: bytes) -> tuple[list[Piece], bytes, ControlHeader | None]:
    """Cut the in-order bytes ``data`` into message pieces.

    Returns the pieces, and the ``pending``/``header`` the stream will hold
    after this segment. Raises ProtocolError at the first invalid header.
    """
    pieces: list[Piece] = []
    pending = stream.pending
    header = stream.header
    i = 0
    n = len(data)
    while i < n:
        if header is None:
            take = min(CONTROL_HEADER_LEN - len(pending), n - i)
            pending += data[i : i + take]
            i += take
            if len(pending) < CONTROL_HEADER_LEN:
                break
            header = parse_control_header(pending)
            start, at = CONTROL_HEADER_LEN - take, i - take
        else:
            start, at = len(pending), i
        take = min(header.length - len(pending), n - i)
        pending += data[i : i + take]
        i += take
        pieces.append(Piece(header, pending, start, at))
        if len(pending) == header.length:
            pending, header = b"", None
    return pieces, pending, header
