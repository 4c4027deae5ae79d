"""Cross-checks against two independent parsers: scapy's PPTP/GRE layers and tshark.

scapy builds anything and rejects nothing, which makes it a good second
opinion on field offsets: messages built by scapy must parse in natedit with
the same fields, and natedit's messages must decode in scapy the same way.
tshark then reads a pcap of natedit's *rewritten* output and must see the
Call IDs natedit meant to write, with valid IP and TCP checksums.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import GRE_PPTP
from scapy.layers.pptp import (
    PPTP,
    PPTPCallClearRequest,
    PPTPCallDisconnectNotify,
    PPTPEchoReply,
    PPTPEchoRequest,
    PPTPIncomingCallConnected,
    PPTPIncomingCallReply,
    PPTPIncomingCallRequest,
    PPTPOutgoingCallReply,
    PPTPOutgoingCallRequest,
    PPTPSetLinkInfo,
    PPTPStartControlConnectionReply,
    PPTPStartControlConnectionRequest,
    PPTPStopControlConnectionReply,
    PPTPStopControlConnectionRequest,
    PPTPWANErrorNotify,
)

from natedit import MessageType
from natedit.core.wire import (
    MESSAGE_LENGTH,
    OWN_CALL_ID_OFFSET,
    PEER_CALL_ID_OFFSET,
    RESULT_CODE_OFFSET,
    TCP_ACK,
    TCP_SYN,
    build_control_message,
    build_gre,
    parse_control_message,
    parse_gre,
    parse_ipv4,
)
from tests.conftest import require_tool
from tests.pptp_flows import (
    IN,
    OUT,
    PUBLIC,
    SERVER,
    Conversation,
    gre_in,
    gre_out,
    make_translator,
    msg,
    out_bytes,
    payload_of,
    split_messages,
    u16,
    write_pcap,
)

MT = MessageType

SCAPY: dict[MessageType, Any] = {
    MT.START_CONTROL_CONNECTION_REQUEST: PPTPStartControlConnectionRequest,
    MT.START_CONTROL_CONNECTION_REPLY: PPTPStartControlConnectionReply,
    MT.STOP_CONTROL_CONNECTION_REQUEST: PPTPStopControlConnectionRequest,
    MT.STOP_CONTROL_CONNECTION_REPLY: PPTPStopControlConnectionReply,
    MT.ECHO_REQUEST: PPTPEchoRequest,
    MT.ECHO_REPLY: PPTPEchoReply,
    MT.OUTGOING_CALL_REQUEST: PPTPOutgoingCallRequest,
    MT.OUTGOING_CALL_REPLY: PPTPOutgoingCallReply,
    MT.INCOMING_CALL_REQUEST: PPTPIncomingCallRequest,
    MT.INCOMING_CALL_REPLY: PPTPIncomingCallReply,
    MT.INCOMING_CALL_CONNECTED: PPTPIncomingCallConnected,
    MT.CALL_CLEAR_REQUEST: PPTPCallClearRequest,
    MT.CALL_DISCONNECT_NOTIFY: PPTPCallDisconnectNotify,
    MT.WAN_ERROR_NOTIFY: PPTPWANErrorNotify,
    MT.SET_LINK_INFO: PPTPSetLinkInfo,
}


def scapy_fields(mt: MessageType, call_id: int, peer: int, result: int) -> dict[str, int]:
    """The keyword arguments for scapy's class of ``mt`` that natedit models."""
    fields: dict[str, int] = {"len": MESSAGE_LENGTH[mt]}  # scapy's ICRP default is wrong
    names = {f.name for f in SCAPY[mt].fields_desc}
    if mt in OWN_CALL_ID_OFFSET:
        fields["call_id"] = call_id
    if mt in PEER_CALL_ID_OFFSET:
        fields["peer_call_id"] = peer
    if mt in RESULT_CODE_OFFSET:
        fields["result_code"] = result
    assert set(fields) <= names
    return fields


@pytest.mark.parametrize("mt", list(MT), ids=lambda t: t.name)
def test_scapy_built_messages_parse_in_natedit(mt: MessageType) -> None:
    for call_id, peer, result in [(0x1234, 0x0080, 1), (0xFFFF, 0x0001, 7), (0, 0xABCD, 2)]:
        data = bytes(SCAPY[mt](**scapy_fields(mt, call_id, peer, result)))
        assert len(data) == MESSAGE_LENGTH[mt]
        m = parse_control_message(data)
        assert m.message_type is mt
        assert m.call_id == (call_id if mt in OWN_CALL_ID_OFFSET else None)
        assert m.peer_call_id == (peer if mt in PEER_CALL_ID_OFFSET else None)
        assert m.result_code == (result if mt in RESULT_CODE_OFFSET else None)


@pytest.mark.parametrize("mt", list(MT), ids=lambda t: t.name)
def test_natedit_messages_decode_in_scapy(mt: MessageType) -> None:
    data = build_control_message(mt, call_id=0x1234, peer_call_id=0x0080, result_code=1)
    p = PPTP(data)
    assert isinstance(p, SCAPY[mt])
    assert (p.len, p.type, p.magic_cookie, p.ctrl_msg_type) == (
        MESSAGE_LENGTH[mt], 1, 0x1A2B3C4D, int(mt))
    if mt in OWN_CALL_ID_OFFSET:
        assert p.call_id == 0x1234
    if mt in PEER_CALL_ID_OFFSET:
        assert p.peer_call_id == 0x0080
    if mt in RESULT_CODE_OFFSET:
        assert p.result_code == 1
    if mt is MT.OUTGOING_CALL_REQUEST:
        assert p.call_serial_number == 0


def test_gre_agrees_with_scapy() -> None:
    for seq, ack, payload in [(7, None, b"\xff\x03"), (8, 3, b"\x01"), (None, 9, b"")]:
        sp = IP(src=SERVER, dst=PUBLIC) / GRE_PPTP(
            call_id=0x1234, seqnum_present=int(seq is not None),
            acknum_present=int(ack is not None), sequence_number=seq, ack_number=ack) / payload
        raw = bytes(sp)
        ip = parse_ipv4(raw)
        g = parse_gre(raw, ip.ihl)
        assert (g.call_id, g.sequence, g.ack, g.payload_length) == (0x1234, seq, ack,
                                                                   len(payload))
        built = build_gre(SERVER, PUBLIC, 0x1234, payload, seq=seq, ack=ack)
        assert raw[20:] == built[20:]  # the same GRE bytes (the IP ident/flags differ)
        mine = IP(built)
        assert mine.haslayer(GRE_PPTP)  # scapy picks the enhanced GRE class for version 1
        gre = mine[GRE_PPTP]
        assert (gre.call_id, gre.version, gre.key_present, gre.payload_len) == (
            0x1234, 1, 1, len(payload))
        assert (gre.seqnum_present, gre.acknum_present) == (seq is not None, ack is not None)
        if seq is not None:
            assert gre.sequence_number == seq
        if ack is not None:
            assert gre.ack_number == ack


def scapy_checksums_ok(raw: bytes) -> bool:
    p = IP(raw)
    ip_sum = p.chksum
    inner = p[TCP] if p.haslayer(TCP) else None
    tcp_sum = inner.chksum if inner is not None else None
    del p.chksum
    if inner is not None:
        del inner.chksum
    again = IP(bytes(p))
    return bool(again.chksum == ip_sum and (inner is None or again[TCP].chksum == tcp_sum))


# -- natedit's rewritten output, read by scapy and tshark --------------------------------------

CLIENTS = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
CALL_ID = 0x1234


def three_client_capture() -> tuple[list[bytes], list[dict[str, str]], list[int]]:
    """Three clients with the same Call ID; the packets as they leave, and expectations.

    Each expectation maps a tshark field to the value it must show ("" = absent).
    Client 3 sends its Outgoing-Call-Request cut between the two Call ID bytes.
    """
    tr = make_translator()
    packets: list[bytes] = []
    expect: list[dict[str, str]] = []
    publics: list[int] = []

    def put(conv: Conversation, d: Any, payload: bytes, **fields: object) -> bytes:
        pkt = conv.segment(d, payload)
        v = conv.send(d, payload, flags=TCP_ACK)
        out = out_bytes(v, pkt)
        packets.append(out)
        expect.append({k: str(x) for k, x in fields.items()})
        return out

    def put_raw(conv: Conversation, d: Any, pkt: bytes, **fields: object) -> bytes:
        out = out_bytes(conv.feed(d, pkt), pkt)
        packets.append(out)
        expect.append({k: str(x) for k, x in fields.items()})
        return out

    for i, client in enumerate(CLIENTS):
        conv = Conversation(tr, client, client_port=40000 + i)
        put_raw(conv, OUT, conv.segment(OUT, b"", seq=conv.out_seq - 1, flags=TCP_SYN))
        put_raw(conv, IN, conv.segment(IN, b"", seq=conv.in_seq - 1, flags=TCP_SYN | TCP_ACK))
        put(conv, OUT, msg(MT.START_CONTROL_CONNECTION_REQUEST))
        put(conv, IN, msg(MT.START_CONTROL_CONNECTION_REPLY))
        ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=CALL_ID, serial=i)
        if i == 2:
            first = put(conv, OUT, ocrq[:13])
            rest = put(conv, OUT, ocrq[13:])
            # tshark's PPTP dissector does not reassemble: these two frames are checked
            # through its TCP stream reassembly instead (test_tshark_reassembled_stream)
            public = u16(payload_of(first)[12:13] + payload_of(rest)[:1], 0)
        else:
            public = u16(payload_of(put(conv, OUT, ocrq)), 12)
            expect[-1]["pptp.call_id"] = str(public)
        publics.append(public)
        server_id = 0x80 * (i + 1)
        put(conv, IN, msg(MT.OUTGOING_CALL_REPLY, call_id=server_id, peer_call_id=public),
            **{"pptp.call_id": server_id, "pptp.peer_call_id": CALL_ID})
        put(conv, IN, msg(MT.SET_LINK_INFO, peer_call_id=public),
            **{"pptp.peer_call_id": CALL_ID})
        put_raw(conv, IN, gre_in(public), **{"gre.key.call_id": CALL_ID, "ip.dst": client})
        put_raw(conv, OUT, gre_out(client, server_id),
                **{"gre.key.call_id": server_id, "ip.src": PUBLIC})
        put_raw(conv, IN, build_gre(SERVER, PUBLIC, public, seq=None, ack=1),
                **{"gre.key.call_id": CALL_ID, "gre.ack_number": 1, "ip.dst": client})
        put(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=CALL_ID),
            **{"pptp.call_id": public})
        put(conv, IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=server_id),
            **{"pptp.call_id": CALL_ID})
    assert len(set(publics)) == 3
    assert tr.calls() == []
    return packets, expect, publics


def test_rewritten_output_decodes_in_scapy() -> None:
    packets, expect, _ = three_client_capture()
    for raw, want in zip(packets, expect, strict=True):
        assert scapy_checksums_ok(raw)
        p = IP(raw)
        if "gre.key.call_id" in want:
            assert p[GRE_PPTP].call_id == int(want["gre.key.call_id"])
        if p.haslayer(TCP) and p.haslayer(PPTP) and "pptp.peer_call_id" in want:
            assert p[PPTP].peer_call_id == int(want["pptp.peer_call_id"])


FIELDS = ["frame.number", "ip.src", "ip.dst", "ip.checksum.status", "tcp.checksum.status",
          "pptp.control_message_type", "pptp.call_id", "pptp.peer_call_id",
          "gre.key.call_id", "gre.ack_number"]


def tshark_fields(pcap: Path) -> list[dict[str, str]]:
    tshark = require_tool("tshark")
    cmd = [tshark, "-r", str(pcap), "-o", "tcp.check_checksum:TRUE",
           "-o", "ip.check_checksum:TRUE", "-T", "fields", "-E", "separator=\t",
           "-E", "occurrence=a"]
    for f in FIELDS:
        cmd += ["-e", f]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return [dict(zip(FIELDS, line.split("\t"), strict=True))
            for line in result.stdout.splitlines()]


def test_tshark_sees_the_call_ids_natedit_wrote(tmp_path: Path) -> None:
    packets, expect, publics = three_client_capture()
    pcap = tmp_path / "rewritten.pcap"
    write_pcap(str(pcap), packets)
    rows = tshark_fields(pcap)
    assert len(rows) == len(packets)
    for row, want, raw in zip(rows, expect, packets, strict=True):
        where = f"frame {row['frame.number']}: {row}"
        assert row["ip.checksum.status"] == "1", where  # 1 = Good
        if raw[9] == 6:
            assert row["tcp.checksum.status"] == "1", where
        for field, value in want.items():
            assert row[field] == value, (field, where)
    # every Outgoing-Call-Request tshark decoded carries a distinct public Call ID
    ocrq = [r["pptp.call_id"] for r in rows if r["pptp.control_message_type"] == "7"]
    assert ocrq == [str(publics[0]), str(publics[1]), ""]  # the third one is cut in two


def test_tshark_reassembled_stream_of_the_split_request(tmp_path: Path) -> None:
    """Client 3's request, cut inside its Call ID, as tshark's TCP reassembly sees it."""
    packets, _, publics = three_client_capture()
    pcap = tmp_path / "rewritten.pcap"
    write_pcap(str(pcap), packets)
    tshark = require_tool("tshark")
    result = subprocess.run(
        [tshark, "-r", str(pcap), "-q", "-z", "follow,tcp,raw,2"],
        capture_output=True, text=True, timeout=60, check=True)
    client_bytes = b"".join(
        bytes.fromhex(line.strip()) for line in result.stdout.splitlines()
        if line and not line.startswith(("=", "Follow", "Filter", "Node", "\t"))
        and all(c in "0123456789abcdef" for c in line.strip()))
    messages = split_messages(client_bytes)
    assert [u16(m, 8) for m in messages] == [1, 7, 12]
    assert u16(messages[1], 12) == publics[2] == u16(messages[2], 12)


def test_tshark_flags_a_broken_checksum(tmp_path: Path) -> None:
    """The checker can fail: a flipped payload bit shows as a bad TCP checksum."""
    packets, _, _ = three_client_capture()
    bad = bytearray(packets[2])
    bad[-1] ^= 0x01
    pcap = tmp_path / "bad.pcap"
    write_pcap(str(pcap), [bytes(bad)])
    [row] = tshark_fields(pcap)
    assert row["tcp.checksum.status"] == "0"  # 0 = Bad


@pytest.mark.parametrize(("mt", "field"), [
    (MT.START_CONTROL_CONNECTION_REPLY, "result_code"),
    (MT.STOP_CONTROL_CONNECTION_REPLY, "result_code"),
    (MT.ECHO_REPLY, "result_code"),
])
def test_builder_result_codes_natedit_does_not_read(mt: MessageType, field: str) -> None:
    p = PPTP(build_control_message(mt, result_code=2))
    assert getattr(p, field) == 2
    if mt is MT.ECHO_REPLY:
        assert p.identifier == 0
    if mt is MT.START_CONTROL_CONNECTION_REPLY:
        assert p.protocol_version == 0x0100
