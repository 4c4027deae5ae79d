"""Async-HDLC framing for PPP (RFC 1662): FCS-16, byte stuffing, a streaming deframer.

pptp-linux (``--nolaunchpppd``) and pptpd's ``pptpctrl`` both exchange PPP frames with
their local peer in this format and check the FCS, so the harness has to produce and
consume it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

FLAG = 0x7E
ESCAPE = 0x7D
ESCAPE_XOR = 0x20
FCS_INIT = 0xFFFF
FCS_GOOD = 0xF0B8

PPP_ADDRESS = 0xFF
PPP_CONTROL = 0x03
PPP_PROTO_IP = 0x0021
PPP_PROTO_LCP = 0xC021
# Unassigned PPP protocol number used for harness frames ("NE"; valid PPP number format),
# so dissectors do not try to parse the payload as IP.
PPP_PROTO_HARNESS = 0x4E45


def _make_fcs_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0x8408 if value & 1 else value >> 1
        table.append(value & 0xFFFF)
    return tuple(table)


_FCS_TABLE = _make_fcs_table()


def fcs16(data: bytes, fcs: int = FCS_INIT) -> int:
    """RFC 1662 FCS-16 (reflected CCITT polynomial 0x8408), not complemented."""
    for byte in data:
        fcs = (fcs >> 8) ^ _FCS_TABLE[(fcs ^ byte) & 0xFF]
    return fcs


def ppp_frame(protocol: int, info: bytes) -> bytes:
    """A PPP frame with address/control field and a two-byte protocol, without FCS."""
    return bytes((PPP_ADDRESS, PPP_CONTROL)) + protocol.to_bytes(2, "big") + info


def hdlc_encode(frame: bytes, *, accm: int = 0xFFFFFFFF) -> bytes:
    """Append the FCS, byte-stuff (flag, escape and every ACCM control char), add flags."""
    fcs = fcs16(frame) ^ 0xFFFF
    raw = frame + bytes((fcs & 0xFF, fcs >> 8))
    out = bytearray((FLAG,))
    for byte in raw:
        if byte in (FLAG, ESCAPE) or (byte < 0x20 and accm & (1 << byte)):
            out += bytes((ESCAPE, byte ^ ESCAPE_XOR))
        else:
            out.append(byte)
    out.append(FLAG)
    return bytes(out)


@dataclass
class HdlcDeframer:
    """Streaming deframer: feed() bytes as they arrive, get whole FCS-checked frames back.

    Returned frames have the FCS removed. Frames whose FCS is wrong (or that are too short
    to hold one) are counted in ``bad_fcs`` and dropped.
    """

    bad_fcs: int = 0
    frames: int = 0
    _buf: bytearray = field(default_factory=bytearray)
    _escaped: bool = False
    _in_frame: bool = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        for byte in data:
            if byte == FLAG:
                if self._buf:
                    frame = self._finish()
                    if frame is not None:
                        yield frame
                self._buf.clear()
                self._escaped = False
                self._in_frame = True
                continue
            if not self._in_frame:
                continue  # garbage before the first flag
            if self._escaped:
                self._buf.append(byte ^ ESCAPE_XOR)
                self._escaped = False
            elif byte == ESCAPE:
                self._escaped = True
            else:
                self._buf.append(byte)

    def _finish(self) -> bytes | None:
        raw = bytes(self._buf)
        if len(raw) < 3 or fcs16(raw) != FCS_GOOD:
            self.bad_fcs += 1
            return None
        self.frames += 1
        return raw[:-2]


def hdlc_decode_all(data: bytes) -> list[bytes]:
    """Deframe a complete byte string (convenience for tests)."""
    return list(HdlcDeframer().feed(data))
