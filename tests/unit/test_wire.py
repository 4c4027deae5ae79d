"""Wire formats: every control message type, header validation, GRE and IPv4.

Table-driven with real bytes. The fifteen control messages below were built with
scapy 2.8 (``scapy.layers.pptp``, Incoming-Call-Reply with ``len=24`` because
scapy's default of 148 is wrong) and decoded by tshark 4.0, which reported the
same Length, Call ID, Peer's Call ID, serial number and result code as the
``EXPECTED`` table. Trailing zero bytes are written as a length to keep the
table readable.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natedit import MessageType, ProtocolError
from natedit.core.wire import (
    CONTROL_HEADER_LEN,
    MAGIC_COOKIE,
    MAX_MESSAGE_LENGTH,
    MESSAGE_LENGTH,
    OWN_CALL_ID_OFFSET,
    PEER_CALL_ID_OFFSET,
    RESULT_CODE_OFFSET,
    ControlMessage,
    build_control_message,
    build_gre,
    build_ipv4,
    build_tcp,
    parse_control_header,
    parse_control_message,
    parse_gre,
    parse_ipv4,
    tcp_checksum,
)
from tests.pptp_flows import ip_checksum_ok, tcp_checksum_ok

MT = MessageType


def _hex(prefix: str, length: int) -> bytes:
    data = bytes.fromhex(prefix)
    assert len(data) <= length
    return data + bytes(length - len(data))


REAL: dict[MessageType, bytes] = {
    MT.START_CONTROL_CONNECTION_REQUEST: _hex(
        "009c00011a2b3c4d00010000010000000000000000000000ffff0100706e730000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "00000000000000006c6162", 156),
    MT.START_CONTROL_CONNECTION_REPLY: _hex(
        "009c00011a2b3c4d00020000010001000000000000000000ffff01007061630000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "00000000000000006c6162", 156),
    MT.STOP_CONTROL_CONNECTION_REQUEST: _hex("001000011a2b3c4d0003000001", 16),
    MT.STOP_CONTROL_CONNECTION_REPLY: _hex("001000011a2b3c4d0004000001", 16),
    MT.ECHO_REQUEST: _hex("001000011a2b3c4d0005000001020304", 16),
    MT.ECHO_REPLY: _hex("001400011a2b3c4d000600000102030401", 20),
    MT.OUTGOING_CALL_REQUEST: _hex(
        "00a800011a2b3c4d0007000012340007000080008000000000000003000000030010", 168),
    MT.OUTGOING_CALL_REPLY: _hex("002000011a2b3c4d00080000008012340100000005f5e1000010", 32),
    MT.INCOMING_CALL_REQUEST: _hex("00dc00011a2b3c4d000900000100000900000003", 220),
    MT.INCOMING_CALL_REPLY: _hex("001800011a2b3c4d000a00002345010001000040", 24),
    MT.INCOMING_CALL_CONNECTED: _hex(
        "001c00011a2b3c4d000b00002345000005f5e1000040000000000001", 28),
    MT.CALL_CLEAR_REQUEST: _hex("001000011a2b3c4d000c00001234", 16),
    MT.CALL_DISCONNECT_NOTIFY: _hex("009400011a2b3c4d000d0000008003", 148),
    MT.WAN_ERROR_NOTIFY: _hex("002800011a2b3c4d000e00001234000000000005", 40),
    MT.SET_LINK_INFO: _hex("001800011a2b3c4d000f000012340000ffffffffffffffff", 24),
}

EXPECTED: dict[MessageType, tuple[int, int | None, int | None, int | None]] = {
    # type: (Length, Call ID, Peer's Call ID, Result Code) as tshark decoded them
    MT.START_CONTROL_CONNECTION_REQUEST: (156, None, None, None),
    MT.START_CONTROL_CONNECTION_REPLY: (156, None, None, None),
    MT.STOP_CONTROL_CONNECTION_REQUEST: (16, None, None, None),
    MT.STOP_CONTROL_CONNECTION_REPLY: (16, None, None, None),
    MT.ECHO_REQUEST: (16, None, None, None),
    MT.ECHO_REPLY: (20, None, None, None),
    MT.OUTGOING_CALL_REQUEST: (168, 0x1234, None, None),
    MT.OUTGOING_CALL_REPLY: (32, 0x0080, 0x1234, 1),
    MT.INCOMING_CALL_REQUEST: (220, 0x0100, None, None),
    MT.INCOMING_CALL_REPLY: (24, 0x2345, 0x0100, 1),
    MT.INCOMING_CALL_CONNECTED: (28, None, 0x2345, None),
    MT.CALL_CLEAR_REQUEST: (16, 0x1234, None, None),
    MT.CALL_DISCONNECT_NOTIFY: (148, 0x0080, None, None),
    MT.WAN_ERROR_NOTIFY: (40, None, 0x1234, None),
    MT.SET_LINK_INFO: (24, None, 0x1234, None),
}

ALL_TYPES = list(MT)


def reason_of(data: bytes | bytearray | memoryview, whole: bool = True) -> str:
    with pytest.raises(ProtocolError) as info:
        if whole:
            parse_control_message(data)
        else:
            parse_control_header(data)
    return info.value.reason


def header(length: int, pptp_type: int = 1, cookie: int = MAGIC_COOKIE, ctype: int = 5,
           reserved: int = 0) -> bytes:
    return struct.pack("!HHIHH", length, pptp_type, cookie, ctype, reserved)


# -- the fifteen message types ----------------------------------------------------------


def test_tables_cover_all_fifteen_types() -> None:
    assert len(ALL_TYPES) == 15
    assert set(REAL) == set(EXPECTED) == set(MESSAGE_LENGTH) == set(ALL_TYPES)
    assert [int(t) for t in ALL_TYPES] == list(range(1, 16))
    assert MAX_MESSAGE_LENGTH == 220


@pytest.mark.parametrize("mt", ALL_TYPES, ids=lambda t: t.name)
def test_real_bytes_parse(mt: MessageType) -> None:
    data = REAL[mt]
    length, call_id, peer_call_id, result = EXPECTED[mt]
    assert len(data) == length == MESSAGE_LENGTH[mt]
    for view in (data, bytearray(data), memoryview(data)):
        m = parse_control_message(view)
        assert m == ControlMessage(mt, call_id, peer_call_id, result, data)
        assert type(m.raw) is bytes
    h = parse_control_header(data)
    assert (h.length, h.pptp_type, h.cookie, h.message_type) == (length, 1, MAGIC_COOKIE, mt)


@pytest.mark.parametrize("mt", ALL_TYPES, ids=lambda t: t.name)
def test_build_parse_round_trip(mt: MessageType) -> None:
    data = build_control_message(mt, call_id=0xBEEF, peer_call_id=0x0102, result_code=7)
    assert len(data) == MESSAGE_LENGTH[mt]
    m = parse_control_message(data)
    assert m.message_type is mt
    assert m.call_id == (0xBEEF if mt in OWN_CALL_ID_OFFSET else None)
    assert m.peer_call_id == (0x0102 if mt in PEER_CALL_ID_OFFSET else None)
    assert m.result_code == (7 if mt in RESULT_CODE_OFFSET else None)
    assert m.raw == data


@pytest.mark.parametrize("mt", ALL_TYPES, ids=lambda t: t.name)
def test_builder_matches_real_bytes_in_header_and_call_id_fields(mt: MessageType) -> None:
    _, call_id, peer_call_id, result = EXPECTED[mt]
    built = build_control_message(mt, call_id=call_id or 0, peer_call_id=peer_call_id or 0,
                                  result_code=result or 1)
    real = REAL[mt]
    assert built[:CONTROL_HEADER_LEN] == real[:CONTROL_HEADER_LEN]
    for table in (OWN_CALL_ID_OFFSET, PEER_CALL_ID_OFFSET):
        if mt in table:
            assert built[table[mt] : table[mt] + 2] == real[table[mt] : table[mt] + 2]
    if mt in RESULT_CODE_OFFSET:
        assert built[RESULT_CODE_OFFSET[mt]] == real[RESULT_CODE_OFFSET[mt]]


@given(
    mt=st.sampled_from(ALL_TYPES),
    call_id=st.integers(0, 0xFFFF),
    peer_call_id=st.integers(0, 0xFFFF),
    result=st.integers(0, 0xFF),
)
def test_round_trip_property(mt: MessageType, call_id: int, peer_call_id: int,
                             result: int) -> None:
    data = build_control_message(mt, call_id=call_id, peer_call_id=peer_call_id,
                                 result_code=result)
    m = parse_control_message(data)
    assert (m.call_id, m.peer_call_id, m.result_code) == (
        call_id if mt in OWN_CALL_ID_OFFSET else None,
        peer_call_id if mt in PEER_CALL_ID_OFFSET else None,
        result if mt in RESULT_CODE_OFFSET else None,
    )


def test_outgoing_call_request_serial_is_not_a_peer_call_id() -> None:
    data = build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=0x1234, serial=0x0007)
    assert data[12:16] == bytes.fromhex("12340007")
    assert parse_control_message(data).peer_call_id is None


def test_field_offsets_are_those_of_the_reference_table() -> None:
    # shared/reference/pptp.md, "Control messages" table.
    assert OWN_CALL_ID_OFFSET == {
        MT.OUTGOING_CALL_REQUEST: 12, MT.OUTGOING_CALL_REPLY: 12,
        MT.INCOMING_CALL_REQUEST: 12, MT.INCOMING_CALL_REPLY: 12,
        MT.CALL_CLEAR_REQUEST: 12, MT.CALL_DISCONNECT_NOTIFY: 12,
    }
    assert PEER_CALL_ID_OFFSET == {
        MT.OUTGOING_CALL_REPLY: 14, MT.INCOMING_CALL_REPLY: 14,
        MT.INCOMING_CALL_CONNECTED: 12, MT.WAN_ERROR_NOTIFY: 12, MT.SET_LINK_INFO: 12,
    }
    assert RESULT_CODE_OFFSET == {MT.OUTGOING_CALL_REPLY: 16, MT.INCOMING_CALL_REPLY: 16}


def test_echo_reply_result_code_offset() -> None:
    # RFC 2637 2.6: Identifier @12 (u32), Result Code @16, Error Code @17; scapy and
    # tshark agree (REAL[ECHO_REPLY] is 00000000 01 after the header for result 1).
    built = build_control_message(MT.ECHO_REPLY, result_code=1)
    assert built[12:16] == bytes(4)
    assert built[16] == 1


# -- header validation: reasons and their order -----------------------------------------

HEADER_CASES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "short_header"),
    ("one byte", b"\x00", "short_header"),
    ("eleven bytes of a valid header", header(16)[:11], "short_header"),
    ("management message type 2", header(16, pptp_type=2), "bad_pptp_type"),
    ("pptp type 0", header(16, pptp_type=0), "bad_pptp_type"),
    ("pptp type 0xffff", header(16, pptp_type=0xFFFF), "bad_pptp_type"),
    ("cookie 0", header(16, cookie=0), "bad_cookie"),
    ("cookie byte-swapped", header(16, cookie=0x4D3C2B1A), "bad_cookie"),
    ("cookie off by one", header(16, cookie=MAGIC_COOKIE + 1), "bad_cookie"),
    ("control type 0", header(16, ctype=0), "bad_message_type"),
    ("control type 16", header(16, ctype=16), "bad_message_type"),
    ("control type 0xffff", header(16, ctype=0xFFFF), "bad_message_type"),
    ("Length 0", header(0), "bad_length"),
    ("Length 11 (below the header)", header(11), "bad_length"),
    ("Length 12 (header only)", header(12), "bad_length"),
    ("Length 15 (below Echo-Request)", header(15), "bad_length"),
    ("Length 17 (above Echo-Request)", header(17), "bad_length"),
    ("Length 220 for Echo-Request", header(220), "bad_length"),
    ("Length 65535", header(65535), "bad_length"),
    # several faults at once: the first check in the order wins
    ("short beats everything", header(0, 2, 0, 0)[:11], "short_header"),
    ("pptp type before cookie", header(16, pptp_type=2, cookie=0), "bad_pptp_type"),
    ("pptp type before all", header(0, pptp_type=2, cookie=0, ctype=99), "bad_pptp_type"),
    ("cookie before message type", header(16, cookie=0, ctype=0), "bad_cookie"),
    ("cookie before length", header(0, cookie=0), "bad_cookie"),
    ("message type before length", header(0, ctype=16), "bad_message_type"),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
def test_header_reasons(data: bytes, reason: str) -> None:
    assert reason_of(data, whole=False) == reason
    # a whole-message parse reports the header's reason first, even with a body
    if len(data) >= CONTROL_HEADER_LEN:
        assert reason_of(data + bytes(16)) == reason


@pytest.mark.parametrize("mt", ALL_TYPES, ids=lambda t: t.name)
def test_every_type_rejects_every_other_length(mt: MessageType) -> None:
    size = MESSAGE_LENGTH[mt]
    for length in (0, 11, 12, size - 1, size + 1, 65535, *MESSAGE_LENGTH.values()):
        if length == size:
            continue
        data = header(length, ctype=mt)
        with pytest.raises(ProtocolError) as info:
            parse_control_header(data)
        assert info.value.reason == "bad_length"
        assert str(size) in info.value.detail and mt.name in info.value.detail


def test_reserved0_is_not_validated() -> None:
    # RFC 2637 says "must be 0"; natedit, like the kernel helper, does not check it.
    parse_control_header(header(16, reserved=0xFFFF))


def test_error_text_is_reason_colon_detail() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_control_header(header(16, cookie=0))
    assert str(info.value) == "bad_cookie: magic cookie 0x00000000"
    assert info.value.detail == "magic cookie 0x00000000"


@pytest.mark.parametrize("mt", ALL_TYPES, ids=lambda t: t.name)
def test_every_prefix_and_trailing_bytes(mt: MessageType) -> None:
    """h11-style: the reader sees a message one byte at a time, and with trailing bytes."""
    data = REAL[mt]
    for k in range(len(data)):
        expect = "short_header" if k < CONTROL_HEADER_LEN else "length_mismatch"
        assert reason_of(data[:k]) == expect, k
        if k >= CONTROL_HEADER_LEN:
            assert parse_control_header(data[:k]).length == len(data)
    assert parse_control_message(data).raw == data
    assert reason_of(data + b"\x00") == "length_mismatch"
    assert reason_of(data + data) == "length_mismatch"


def test_length_mismatch_detail() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_control_message(REAL[MT.CALL_CLEAR_REQUEST][:14])
    assert (info.value.reason, info.value.detail) == ("length_mismatch", "Length 16, have 14 bytes")


def test_header_at_an_offset() -> None:
    buf = b"\xaa" * 5 + REAL[MT.OUTGOING_CALL_REPLY] + REAL[MT.ECHO_REQUEST]
    assert parse_control_header(buf, 5).message_type is MT.OUTGOING_CALL_REPLY
    assert parse_control_header(buf, 5 + 32).message_type is MT.ECHO_REQUEST
    assert reason_of_header_at(buf, 5 + 32 + 5) == "short_header"
    assert reason_of_header_at(buf, 0) == "bad_pptp_type"  # 0xaaaa...


def reason_of_header_at(buf: bytes, offset: int) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_control_header(buf, offset)
    return info.value.reason


# -- enhanced GRE -------------------------------------------------------------------------

# RFC 2637 section 4.1 layout; each also decodes in tshark 4.0 as GRE version 1
# with the Call ID, sequence and acknowledgment numbers of the expected tuple.
GRE_CASES: list[tuple[str, str, tuple[int, int, int | None, int | None, int]]] = [
    ("data 0x3001", "3001880b00041234" "00000007" "ff03c021", (0x1234, 4, 7, None, 12)),
    ("data+ack 0x3081", "3081880b00040080" "00000008" "00000003" "ff03c021",
     (0x0080, 4, 8, 3, 16)),
    ("ack only 0x2081", "2081880b00000080" "00000009", (0x0080, 0, None, 9, 12)),
    ("bare 0x2001", "2001880b0000ffff", (0xFFFF, 0, None, None, 8)),
]


@pytest.mark.parametrize(("hexdata", "expected"), [c[1:] for c in GRE_CASES],
                         ids=[c[0] for c in GRE_CASES])
def test_gre_real_bytes(hexdata: str, expected: tuple[int, int, int | None, int | None, int]
                        ) -> None:
    data = bytes.fromhex(hexdata)
    g = parse_gre(data)
    assert (g.call_id, g.payload_length, g.sequence, g.ack, g.header_length) == expected
    g2 = parse_gre(b"\x00" * 20 + data, 20)
    assert g2 == g


def test_build_gre_matches_real_bytes() -> None:
    pkt = build_gre("198.51.100.2", "198.51.100.1", 0x1234, b"\xff\x03\xc0\x21", seq=7)
    assert pkt[20:] == bytes.fromhex("3001880b00041234" "00000007" "ff03c021")
    pkt = build_gre("10.0.0.5", "198.51.100.2", 0x0080, seq=None, ack=9)
    assert pkt[20:] == bytes.fromhex("2081880b00000080" "00000009")
    pkt = build_gre("10.0.0.5", "198.51.100.2", 0x0080, b"\x01", seq=8, ack=3)
    assert pkt[20:] == bytes.fromhex("3081880b00010080" "00000008" "00000003" "01")
    assert ip_checksum_ok(pkt)


GRE_BAD: list[tuple[str, str, str]] = [
    ("empty", "", "short_gre"),
    ("seven bytes", "3001880b000412", "short_gre"),
    ("sequence number missing", "3001880b00041234000000", "short_gre"),
    ("ack number missing", "2081880b00000080000000", "short_gre"),
    ("ack missing after seq", "3081880b0000008000000001000000", "short_gre"),
    ("version 0 (plain GRE)", "3000880b00041234" "00000007", "not_pptp_gre"),
    ("version 2", "3002880b00041234" "00000007", "not_pptp_gre"),
    ("protocol IPv4, not PPP", "30010800000412340000000700", "not_pptp_gre"),
    ("key bit clear", "1001880b00041234" "00000007", "not_pptp_gre"),
    ("checksum bit set", "b001880b00041234" "00000007", "not_pptp_gre"),
    ("routing bit set", "7001880b00041234" "00000007", "not_pptp_gre"),
]


@pytest.mark.parametrize(("hexdata", "reason"), [c[1:] for c in GRE_BAD],
                         ids=[c[0] for c in GRE_BAD])
def test_gre_reasons(hexdata: str, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_gre(bytes.fromhex(hexdata))
    assert info.value.reason == reason


# -- IPv4 and TCP -------------------------------------------------------------------------


def test_ipv4_build_and_parse() -> None:
    pkt = build_ipv4("10.0.0.5", "198.51.100.2", 47, b"x" * 9, ident=7, ttl=3)
    assert ip_checksum_ok(pkt)
    h = parse_ipv4(pkt)
    assert (h.ihl, h.total_length, h.protocol, h.src, h.dst, h.is_fragment) == (
        20, 29, 47, bytes([10, 0, 0, 5]), bytes([198, 51, 100, 2]), False)
    assert h.flags_fragment == 0x4000  # DF


def test_ipv4_options() -> None:
    opts = b"\x94\x04\x00\x00"  # Router Alert
    pkt = build_ipv4("10.0.0.5", "198.51.100.2", 47, b"abc", options=opts)
    assert pkt[0] == 0x46 and ip_checksum_ok(pkt)
    assert parse_ipv4(pkt).ihl == 24
    with pytest.raises(ValueError):
        build_ipv4("10.0.0.5", "198.51.100.2", 47, b"", options=b"\x01")


@pytest.mark.parametrize(("frag", "is_fragment"), [
    (0x4000, False), (0x0000, False), (0x2000, True), (0x00B9, True), (0x20B9, True),
    (0x8000, False),  # the reserved (evil) bit is not a fragment
])
def test_ipv4_fragment_flag(frag: int, is_fragment: bool) -> None:
    pkt = bytearray(build_ipv4("10.0.0.5", "198.51.100.2", 47, b"abcd"))
    struct.pack_into("!H", pkt, 6, frag)
    assert parse_ipv4(pkt).is_fragment is is_fragment


def _ip(first: int = 0x45, total: int | None = None, size: int = 28) -> bytes:
    pkt = bytearray(build_ipv4("10.0.0.5", "198.51.100.2", 47, bytes(size - 20)))
    pkt[0] = first
    if total is not None:
        struct.pack_into("!H", pkt, 2, total)
    return bytes(pkt)


IPV4_BAD: list[tuple[str, bytes, str]] = [
    ("empty", b"", "short_ip"),
    ("19 bytes", _ip()[:19], "short_ip"),
    ("IPv6", _ip(0x60), "not_ipv4"),
    ("version 0", _ip(0x05), "not_ipv4"),
    ("IHL 4", _ip(0x44), "bad_ip_header"),
    ("IHL 0", _ip(0x40), "bad_ip_header"),
    ("IHL beyond the data", _ip(0x4F), "bad_ip_header"),
    ("total below IHL", _ip(total=19), "bad_ip_header"),
    ("total beyond the data", _ip(total=29), "bad_ip_header"),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in IPV4_BAD],
                         ids=[c[0] for c in IPV4_BAD])
def test_ipv4_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_ipv4(data)
    assert info.value.reason == reason


def test_ipv4_trailing_padding_is_allowed() -> None:
    pkt = _ip() + b"\x00" * 6  # Ethernet minimum-frame padding
    assert parse_ipv4(pkt).total_length == 28


def test_build_tcp_checksums() -> None:
    pkt = build_tcp("10.0.0.5", "198.51.100.2", 40000, 1723, 1000, REAL[MT.ECHO_REQUEST],
                    ip_options=b"\x01\x01\x01\x00")
    assert ip_checksum_ok(pkt) and tcp_checksum_ok(pkt)
    ihl = (pkt[0] & 0x0F) * 4
    assert ihl == 24 and pkt[ihl + 20 :] == REAL[MT.ECHO_REQUEST]
    seg = bytearray(pkt[ihl:])
    csum = struct.unpack_from("!H", seg, 16)[0]
    seg[16:18] = b"\x00\x00"
    assert tcp_checksum(pkt[12:16], pkt[16:20], seg) == csum
