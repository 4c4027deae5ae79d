"""One direction of a control connection as a byte stream: framing and replay.

PPTP control messages ride TCP, so a segment may carry several messages, part
of one, or the tail of one and the head of the next. A :class:`Stream`
follows the sequence space of one direction: ``next_seq`` is the first byte
not yet seen, ``pending`` holds the bytes of the message that is not complete
yet (at most 220: the longest message; an invalid header is rejected before
its Length is trusted), and ``edits`` remembers every byte natedit wrote into
data it already let through, so a retransmission gets exactly the same
rewrite as the original.

:func:`frame` reads the new bytes of a segment *without* changing the stream:
the translator commits only once it has decided to let the segment through.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ._wire import CONTROL_HEADER_LEN, ControlHeader, parse_control_header

SEQ_MOD = 1 << 32
EDIT_WINDOW = 1 << 20
"""How far behind ``next_seq`` a recorded edit is kept: beyond any TCP window
a PPTP peer uses (PPTP moves a few hundred bytes a minute)."""
EDIT_BACKLOG = 4096
"""Most bytes remembered for retransmissions (two per rewritten Call ID)."""


class Stream:
    __slots__ = ("edits", "header", "new_call", "next_seq", "partial", "pending")

    def __init__(self) -> None:
        self.next_seq: int | None = None
        """Sequence number of the next byte in order; None until synchronised."""
        self.pending = b""
        """The bytes of the current, incomplete message."""
        self.header: ControlHeader | None = None
        """The header of ``pending`` once its 12 bytes are in."""
        self.partial: dict[int, object] = {}
        """Field offset -> what was decided for a field whose first byte went out."""
        self.new_call: object = None
        """The call the current message created, until the message completes."""
        self.edits: deque[tuple[int, int]] = deque(maxlen=EDIT_BACKLOG)
        """(sequence number, byte written) of rewritten bytes already forwarded."""

    def resync(self, next_seq: int | None) -> None:
        self.next_seq = next_seq
        self.pending = b""
        self.header = None
        self.partial.clear()
        self.new_call = None

    def record(self, seq: int, value: int) -> None:
        edits = self.edits
        edits.append((seq, value))
        while edits and (seq - edits[0][0]) % SEQ_MOD > EDIT_WINDOW:
            edits.popleft()

    def replay(self, seq: int, length: int) -> list[tuple[int, int]]:
        """(payload offset, byte) of recorded edits that fall in ``[seq, seq + length)``."""
        out = []
        for eseq, value in self.edits:
            off = (eseq - seq) % SEQ_MOD
            if off < length:
                out.append((off, value))
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
