"""Internet checksum (RFC 1071) and its incremental update (RFC 1624).

Every rewrite natedit makes is a same-length change of 16-bit aligned words
(addresses, Call IDs) or of single bytes at a known parity, so the checksum
is updated with ``HC' = ~(~HC + ~m + m')`` (RFC 1624 eqn. 3) instead of
being recomputed over the whole packet.
"""

from __future__ import annotations


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """Full RFC 1071 checksum of ``data`` (odd length is zero-padded)."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\x00"
    total = sum(int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def word_delta(old: int, new: int) -> int:
    """The one's-complement sum ``~m + m'`` for one 16-bit word change."""
    return (~old & 0xFFFF) + new


def address_delta(old: bytes, new: bytes) -> int:
    """``word_delta`` summed over the two words of an IPv4 address change."""
    return word_delta(int.from_bytes(old[0:2], "big"), int.from_bytes(new[0:2], "big")) + (
        word_delta(int.from_bytes(old[2:4], "big"), int.from_bytes(new[2:4], "big"))
    )


def address_deltas(a: bytes, b: bytes) -> tuple[int, int]:
    """(``address_delta(a, b)``, ``address_delta(b, a)``) in one go, each folded to 16
    bits (:func:`fold`): ``(~HC & 0xFFFF) + delta`` then needs one fold only."""
    x, y = int.from_bytes(a, "big"), int.from_bytes(b, "big")
    xh, xl, yh, yl = x >> 16, x & 0xFFFF, y >> 16, y & 0xFFFF
    return (fold((xh ^ 0xFFFF) + yh + (xl ^ 0xFFFF) + yl),
            fold((yh ^ 0xFFFF) + xh + (yl ^ 0xFFFF) + xl))


def fold(total: int) -> int:
    """A one's-complement sum with its carries added back in: 16 bits, never 0 for a
    sum that was not (end-around carry)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def apply_delta(checksum: int, delta: int) -> int:
    """RFC 1624 eqn. 3: the checksum after changes whose summed delta is ``delta``."""
    return ~fold((~checksum & 0xFFFF) + delta) & 0xFFFF
