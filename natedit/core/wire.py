"""Wire formats: IPv4, TCP, PPTP control messages (RFC 2637) and enhanced GRE.

Pure functions over bytes. Parsers raise :class:`ProtocolError` and nothing
else; builders are for tests, the lab and replies natedit makes itself.
Offsets and sizes are those of RFC 2637 section 2 and 4.1 (see
``shared/reference/pptp.md`` for the table this module encodes).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from .checksum import internet_checksum
from .errors import Malformed, PassReason, ProtocolError

PPTP_PORT = 1723
MAGIC_COOKIE = 0x1A2B3C4D
CONTROL_HEADER_LEN = 12
IPPROTO_TCP = 6
IPPROTO_GRE = 47
GRE_PROTO_PPP = 0x880B


class Direction(enum.IntEnum):
    """Which way a packet crosses the gateway."""

    OUTBOUND = 0
    """Inside -> outside: from a private client toward a server."""
    INBOUND = 1
    """Outside -> inside: from a server toward a private client."""


class PptpMessageType(enum.IntEnum):
    """PPTP Message Type field (RFC 2637 section 2.1)."""

    CONTROL = 1
    MANAGEMENT = 2


class MessageType(enum.IntEnum):
    """Control Message Type (RFC 2637 section 2.1)."""

    START_CONTROL_CONNECTION_REQUEST = 1
    START_CONTROL_CONNECTION_REPLY = 2
    STOP_CONTROL_CONNECTION_REQUEST = 3
    STOP_CONTROL_CONNECTION_REPLY = 4
    ECHO_REQUEST = 5
    ECHO_REPLY = 6
    OUTGOING_CALL_REQUEST = 7
    OUTGOING_CALL_REPLY = 8
    INCOMING_CALL_REQUEST = 9
    INCOMING_CALL_REPLY = 10
    INCOMING_CALL_CONNECTED = 11
    CALL_CLEAR_REQUEST = 12
    CALL_DISCONNECT_NOTIFY = 13
    WAN_ERROR_NOTIFY = 14
    SET_LINK_INFO = 15


MT = MessageType

MESSAGE_LENGTH: dict[int, int] = {
    MT.START_CONTROL_CONNECTION_REQUEST: 156,
    MT.START_CONTROL_CONNECTION_REPLY: 156,
    MT.STOP_CONTROL_CONNECTION_REQUEST: 16,
    MT.STOP_CONTROL_CONNECTION_REPLY: 16,
    MT.ECHO_REQUEST: 16,
    MT.ECHO_REPLY: 20,
    MT.OUTGOING_CALL_REQUEST: 168,
    MT.OUTGOING_CALL_REPLY: 32,
    MT.INCOMING_CALL_REQUEST: 220,
    MT.INCOMING_CALL_REPLY: 24,
    MT.INCOMING_CALL_CONNECTED: 28,
    MT.CALL_CLEAR_REQUEST: 16,
    MT.CALL_DISCONNECT_NOTIFY: 148,
    MT.WAN_ERROR_NOTIFY: 40,
    MT.SET_LINK_INFO: 24,
}
"""Exact Length of every control message (RFC 2637 section 2)."""

MAX_MESSAGE_LENGTH = max(MESSAGE_LENGTH.values())

OWN_CALL_ID_OFFSET: dict[int, int] = {
    MT.OUTGOING_CALL_REQUEST: 12,
    MT.OUTGOING_CALL_REPLY: 12,
    MT.INCOMING_CALL_REQUEST: 12,
    MT.INCOMING_CALL_REPLY: 12,
    MT.CALL_CLEAR_REQUEST: 12,
    MT.CALL_DISCONNECT_NOTIFY: 12,
}
"""Where a message carries its *sender's* own Call ID."""

PEER_CALL_ID_OFFSET: dict[int, int] = {
    MT.OUTGOING_CALL_REPLY: 14,
    MT.INCOMING_CALL_REPLY: 14,
    MT.INCOMING_CALL_CONNECTED: 12,
    MT.WAN_ERROR_NOTIFY: 12,
    MT.SET_LINK_INFO: 12,
}
"""Where a message carries the *receiver's* Call ID (the Peer's Call ID)."""

class FieldKind(enum.Enum):
    __hash__ = object.__hash__  # (members are unique: identity, at C speed)

    """What a Call ID field natedit reads in a control message is to it."""

    NEW = "new"
    """Outbound: the client's Call ID of a call this message creates."""
    OWN = "own"
    """Outbound: the client's Call ID of an existing call."""
    PEER = "peer"
    """Inbound: the client's Call ID, as the Peer's Call ID (natedit's public one)."""
    DISCONNECT = "disconnect"
    """Inbound Call-Disconnect-Notify: the server's, or the public, Call ID (see
    :mod:`natedit.core.control`)."""
    SERVER = "server"
    """Inbound: the server's own Call ID; read to find the call, never rewritten."""


@dataclass(frozen=True, slots=True)
class CallIdField:
    """The one Call ID field of a (direction, message type) natedit reads."""

    offset: int
    kind: FieldKind
    server_call_id_at: int | None = None
    """Where a reply carries the server's Call ID (the call learns it), else None."""

    @property
    def rewritten(self) -> bool:
        return self.kind is not FieldKind.SERVER


_OUT = Direction.OUTBOUND
_IN = Direction.INBOUND
_NEW, _OWN, _PEER = FieldKind.NEW, FieldKind.OWN, FieldKind.PEER

CALL_ID_FIELDS: dict[tuple[Direction, MessageType], CallIdField] = {
    # outbound: the client's own Call ID, private -> public
    (_OUT, MT.OUTGOING_CALL_REQUEST): CallIdField(OWN_CALL_ID_OFFSET[MT.OUTGOING_CALL_REQUEST],
                                                  _NEW),
    (_OUT, MT.INCOMING_CALL_REPLY): CallIdField(OWN_CALL_ID_OFFSET[MT.INCOMING_CALL_REPLY],
                                                _NEW, PEER_CALL_ID_OFFSET[MT.INCOMING_CALL_REPLY]),
    (_OUT, MT.OUTGOING_CALL_REPLY): CallIdField(  # the client is a PAC
        OWN_CALL_ID_OFFSET[MT.OUTGOING_CALL_REPLY], _NEW,
        PEER_CALL_ID_OFFSET[MT.OUTGOING_CALL_REPLY]),
    (_OUT, MT.INCOMING_CALL_REQUEST): CallIdField(  # the client is a PAC
        OWN_CALL_ID_OFFSET[MT.INCOMING_CALL_REQUEST], _NEW),
    (_OUT, MT.CALL_CLEAR_REQUEST): CallIdField(OWN_CALL_ID_OFFSET[MT.CALL_CLEAR_REQUEST], _OWN),
    (_OUT, MT.CALL_DISCONNECT_NOTIFY): CallIdField(  # the client is a PAC
        OWN_CALL_ID_OFFSET[MT.CALL_DISCONNECT_NOTIFY], _OWN),
    # inbound: the client's Call ID as the Peer's, public -> private
    (_IN, MT.OUTGOING_CALL_REPLY): CallIdField(PEER_CALL_ID_OFFSET[MT.OUTGOING_CALL_REPLY],
                                               _PEER, OWN_CALL_ID_OFFSET[MT.OUTGOING_CALL_REPLY]),
    (_IN, MT.INCOMING_CALL_REPLY): CallIdField(  # the client is a PAC
        PEER_CALL_ID_OFFSET[MT.INCOMING_CALL_REPLY], _PEER,
        OWN_CALL_ID_OFFSET[MT.INCOMING_CALL_REPLY]),
    (_IN, MT.INCOMING_CALL_CONNECTED): CallIdField(
        PEER_CALL_ID_OFFSET[MT.INCOMING_CALL_CONNECTED], _PEER),
    (_IN, MT.WAN_ERROR_NOTIFY): CallIdField(PEER_CALL_ID_OFFSET[MT.WAN_ERROR_NOTIFY], _PEER),
    (_IN, MT.SET_LINK_INFO): CallIdField(PEER_CALL_ID_OFFSET[MT.SET_LINK_INFO], _PEER),
    (_IN, MT.CALL_DISCONNECT_NOTIFY): CallIdField(OWN_CALL_ID_OFFSET[MT.CALL_DISCONNECT_NOTIFY],
                                                  FieldKind.DISCONNECT),
    (_IN, MT.CALL_CLEAR_REQUEST): CallIdField(  # the client is a PAC: the server clears
        OWN_CALL_ID_OFFSET[MT.CALL_CLEAR_REQUEST], FieldKind.SERVER),
}
"""The one Call ID field each (direction, message type) has for natedit: every one
it rewrites, and the server's Call ID by which a server's Call-Clear-Request names
its call. The message's call is found by this field (once per message)."""

RESULT_CODE_OFFSET: dict[int, int] = {
    MT.OUTGOING_CALL_REPLY: 16,
    MT.INCOMING_CALL_REPLY: 16,
}
_OTHER_RESULT_OFFSET: dict[int, int] = {
    MT.START_CONTROL_CONNECTION_REPLY: 14,
    MT.STOP_CONTROL_CONNECTION_REPLY: 12,
    MT.ECHO_REPLY: 16,
}
"""Result Codes natedit never reads, for the builder (RFC 2637 2.2, 2.4, 2.6)."""
RESULT_CONNECTED = 1
"""Outgoing/Incoming-Call-Reply Result Code 1: the call is up."""

_HEADER = struct.Struct("!HHIHH")
_U16 = struct.Struct("!H")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_GRE = struct.Struct("!BBHHH")

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10


@dataclass(frozen=True, slots=True)
class ControlHeader:
    length: int
    pptp_type: int
    cookie: int
    message_type: MessageType


def parse_control_header(data: bytes | bytearray | memoryview, offset: int = 0) -> ControlHeader:
    """Validate the 12-byte header at ``offset``: type, cookie, Length.

    The checks run in the order libalias and the kernel got wrong: enough
    bytes for a header, PPTP message type, magic cookie, known control type,
    then the Length against that type's exact size.
    """
    if len(data) - offset < CONTROL_HEADER_LEN:
        raise ProtocolError(Malformed.SHORT_HEADER, f"{len(data) - offset} bytes, need 12")
    length, pptp_type, cookie, ctype, _reserved = _HEADER.unpack_from(data, offset)
    if pptp_type != PptpMessageType.CONTROL:
        raise ProtocolError(Malformed.BAD_PPTP_TYPE, f"PPTP message type {pptp_type}")
    if cookie != MAGIC_COOKIE:
        raise ProtocolError(Malformed.BAD_COOKIE, f"magic cookie {cookie:#010x}")
    if ctype not in MESSAGE_LENGTH:
        raise ProtocolError(Malformed.BAD_MESSAGE_TYPE, f"control message type {ctype}")
    expected = MESSAGE_LENGTH[ctype]
    if length != expected:
        raise ProtocolError(
            Malformed.BAD_LENGTH,
            f"{MessageType(ctype).name} Length {length}, expected {expected}"
        )
    return _HEADERS[ctype]


_HEADERS = {int(mt): ControlHeader(n, PptpMessageType.CONTROL, MAGIC_COOKIE, mt)
            for mt, n in ((MessageType(t), n) for t, n in MESSAGE_LENGTH.items())}
"""A valid header is all in its type: one value per type, none made per message."""


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """One whole control message, decoded for humans, tests and replay."""

    message_type: MessageType
    call_id: int | None
    """The sender's own Call ID, where the type has one."""
    peer_call_id: int | None
    """The receiver's Call ID (Peer's Call ID), where the type has one."""
    result_code: int | None
    raw: bytes


def parse_control_message(data: bytes | bytearray | memoryview) -> ControlMessage:
    """Parse exactly one message; trailing bytes are an error."""
    header = parse_control_header(data)
    if len(data) != header.length:
        raise ProtocolError(Malformed.LENGTH_MISMATCH,
                            f"Length {header.length}, have {len(data)} bytes")
    mt = header.message_type
    own = OWN_CALL_ID_OFFSET.get(mt)
    peer = PEER_CALL_ID_OFFSET.get(mt)
    res = RESULT_CODE_OFFSET.get(mt)
    return ControlMessage(
        mt,
        _U16.unpack_from(data, own)[0] if own is not None else None,
        _U16.unpack_from(data, peer)[0] if peer is not None else None,
        data[res] if res is not None else None,
        bytes(data),
    )


def build_control_message(
    message_type: MessageType | int,
    *,
    call_id: int = 0,
    peer_call_id: int = 0,
    result_code: int = 1,
    serial: int = 0,
    length: int | None = None,
    cookie: int = MAGIC_COOKIE,
) -> bytes:
    """A well-formed message of ``message_type`` (fields not named are zero).

    ``length``/``cookie`` exist so tests can build malformed messages.
    """
    size = MESSAGE_LENGTH.get(int(message_type), CONTROL_HEADER_LEN)
    buf = bytearray(size)
    _HEADER.pack_into(
        buf, 0, size if length is None else length, PptpMessageType.CONTROL, cookie,
        int(message_type), 0,
    )
    own = OWN_CALL_ID_OFFSET.get(int(message_type))
    peer = PEER_CALL_ID_OFFSET.get(int(message_type))
    res = RESULT_CODE_OFFSET.get(int(message_type))
    if own is not None:
        _U16.pack_into(buf, own, call_id)
    if peer is not None:
        _U16.pack_into(buf, peer, peer_call_id)
    if res is not None:
        buf[res] = result_code
    if message_type == MT.OUTGOING_CALL_REQUEST:
        _U16.pack_into(buf, 14, serial)
    if message_type in (MT.START_CONTROL_CONNECTION_REQUEST, MT.START_CONTROL_CONNECTION_REPLY):
        buf[12:14] = b"\x01\x00"  # protocol version 1.0
    result_at = _OTHER_RESULT_OFFSET.get(int(message_type))
    if result_at is not None:
        buf[result_at] = result_code
    return bytes(buf)


# -- IPv4 / TCP / GRE -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPv4Header:
    ihl: int
    """Header length in bytes (options included)."""
    total_length: int
    flags_fragment: int
    protocol: int
    src: bytes
    dst: bytes

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_fragment & 0x3FFF)


def ipv4_lengths(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(header length, total length) of the IPv4 packet ``data``, validated: the one
    IPv4 check (at least 20 bytes, version 4, IHL of 5 or more, a total length that
    holds the header and is no longer than the bytes)."""
    n = len(data)
    if n < 20:
        raise ProtocolError(Malformed.SHORT_IP, f"{n} bytes")
    vihl = data[0]
    if vihl >> 4 != 4:
        raise ProtocolError(Malformed.NOT_IPV4, f"IP version {vihl >> 4}")
    ihl = (vihl & 0x0F) * 4
    total = data[2] << 8 | data[3]
    if ihl < 20 or total < ihl or total > n:
        raise ProtocolError(Malformed.BAD_IP_HEADER, f"IHL {ihl}, total length {total}, {n} bytes")
    return ihl, total


def parse_ipv4(data: bytes | bytearray | memoryview) -> IPv4Header:
    ihl, total = ipv4_lengths(data)
    _vihl, _tos, _total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(data, 0)
    return IPv4Header(ihl, total, frag, proto, src, dst)


def build_ipv4(src: str, dst: str, protocol: int, payload: bytes, *, options: bytes = b"",
               ident: int = 0, ttl: int = 64) -> bytes:
    """An IPv4 packet with a correct header checksum (for tests and the lab)."""
    if len(options) % 4:
        raise ValueError("IP options must be a multiple of 4 bytes")
    ihl = 20 + len(options)
    hdr = bytearray(_IPV4.pack(
        0x40 | (ihl // 4), 0, ihl + len(payload), ident, 0x4000, ttl, protocol, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    ) + options)
    _U16.pack_into(hdr, 10, internet_checksum(hdr))
    return bytes(hdr) + payload


def tcp_checksum(ip_src: bytes, ip_dst: bytes, segment: bytes | bytearray | memoryview) -> int:
    """Full TCP checksum over the pseudo-header and ``segment`` (field zeroed by caller)."""
    pseudo = ip_src + ip_dst + struct.pack("!BBH", 0, IPPROTO_TCP, len(segment))
    return internet_checksum(pseudo + bytes(segment))


def build_tcp(src: str, dst: str, sport: int, dport: int, seq: int, payload: bytes = b"", *,
              ack: int = 0, flags: int = TCP_ACK, window: int = 65535,
              ip_options: bytes = b"") -> bytes:
    """An IPv4/TCP packet with correct checksums (for tests and the lab)."""
    seg = bytearray(_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack, 5 << 4, flags, window, 0, 0))
    seg += payload
    s = ipaddress.IPv4Address(src).packed
    d = ipaddress.IPv4Address(dst).packed
    _U16.pack_into(seg, 16, tcp_checksum(s, d, seg))
    return build_ipv4(src, dst, IPPROTO_TCP, bytes(seg), options=ip_options)


def build_gre(src: str, dst: str, call_id: int, payload: bytes = b"", *, seq: int | None = 0,
              ack: int | None = None, ip_options: bytes = b"") -> bytes:
    """An IPv4 packet carrying enhanced GRE (RFC 2637 section 4.1)."""
    flags0 = 0x20 | (0x10 if seq is not None else 0)
    flags1 = 0x01 | (0x80 if ack is not None else 0)
    gre = _GRE.pack(flags0, flags1, GRE_PROTO_PPP, len(payload), call_id)
    if seq is not None:
        gre += struct.pack("!I", seq)
    if ack is not None:
        gre += struct.pack("!I", ack)
    return build_ipv4(src, dst, IPPROTO_GRE, gre + payload, options=ip_options)


ENHANCED_GRE_MASK = 0xE007FFFF
ENHANCED_GRE_VALUE = 0x20010000 | GRE_PROTO_PPP
"""Enhanced GRE (RFC 2637 4.1) is the GRE whose first 32 bits, masked, are this: C=0,
R=0, K=1, version 1, protocol PPP. The one test (:func:`is_pptp_gre`); the kernel
datapath's nftables match is written from these two numbers."""
GRE_SEQ_BIT = 0x10000000
GRE_ACK_BIT = 0x00800000
"""S (a sequence number follows) and A (an acknowledgement number follows)."""
GRE_CALL_ID_AT = 6
"""Offset of the Call ID in the enhanced GRE header (after flags, protocol, length)."""
GRE_HEADER_LEN = 8
"""The enhanced GRE header up to and with the Call ID (sequence and ack. follow)."""


def is_pptp_gre(flags0: int, flags1: int, protocol: int) -> bool:
    """Enhanced GRE: C=0, R=0, K=1, version 1, protocol PPP (RFC 2637 4.1)."""
    return (flags0 << 24 | flags1 << 16 | protocol) & ENHANCED_GRE_MASK == ENHANCED_GRE_VALUE


@dataclass(frozen=True, slots=True)
class GreHeader:
    call_id: int
    payload_length: int
    sequence: int | None
    ack: int | None
    header_length: int


def parse_gre(data: bytes | bytearray | memoryview, offset: int = 0) -> GreHeader:
    """Parse an enhanced GRE header (version 1, PPP, K set) at ``offset``."""
    if len(data) - offset < 8:
        raise ProtocolError(Malformed.SHORT_GRE, f"{len(data) - offset} bytes")
    f0, f1, proto, plen, call_id = _GRE.unpack_from(data, offset)
    if not is_pptp_gre(f0, f1, proto):
        raise ProtocolError(PassReason.NOT_PPTP_GRE,
                            f"flags {f0:#04x} {f1:#04x} protocol {proto:#06x}")
    pos = offset + 8
    seq = ack = None
    if f0 & 0x10:
        if len(data) < pos + 4:
            raise ProtocolError(Malformed.SHORT_GRE, "sequence number missing")
        seq = struct.unpack_from("!I", data, pos)[0]
        pos += 4
    if f1 & 0x80:
        if len(data) < pos + 4:
            raise ProtocolError(Malformed.SHORT_GRE, "acknowledgment number missing")
        ack = struct.unpack_from("!I", data, pos)[0]
        pos += 4
    return GreHeader(call_id, plen, seq, ack, pos - offset)
