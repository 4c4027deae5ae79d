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
_COMPACT_AT = EDIT_BACKLOG // 4
"""Forgotten entries at the head of the array before it is compacted."""


class Stream:
    __slots__ = ("_edits", "_head", "header", "new_call", "next_seq", "partial", "pending",
                 "syn_seq")

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

    def resync(self, next_seq: int | None) -> None:
        self.next_seq = next_seq
        self.pending = b""
        self.header = None
        self.partial.clear()
        self.new_call = None

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
