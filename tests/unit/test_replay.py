"""Offline replay: three clients on one Call ID, checked by tshark.

The capture is crafted as the gateway's queue sees the conversation (private
client addresses on TCP 1723 both ways, inbound GRE to the public address).
The policy allocates sequentially from 1000 so the server's side of the
crafted conversation can name the public Call IDs natedit will choose.
"""

from __future__ import annotations

import io
import ipaddress
import subprocess
import sys
from pathlib import Path

from scapy.layers.pptp import PPTP, PPTPOutgoingCallRequest
from scapy.utils import RawPcapReader, RawPcapWriter

from natedit import Allocation, Policy
from natedit.core.wire import TCP_ACK, TCP_SYN, build_tcp
from natedit.core.wire import MessageType as MT
from natedit.replay import replay
from tests.conftest import require_tool
from tests.pptp_flows import PUBLIC, SERVER, gre_in, gre_out, msg, payload_of

CLIENTS = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
CLIENT_CALL_ID = 0x1234
FIRST_PUBLIC = 1000


def conversation() -> list[bytes]:
    packets: list[bytes] = []
    for i, client in enumerate(CLIENTS):
        packets += control_packets(i, client)
    for i, client in enumerate(CLIENTS):
        packets.append(gre_out(client, 128 * i))
        packets.append(gre_in(FIRST_PUBLIC + i))
    return packets


def control_packets(i: int, client: str) -> list[bytes]:
    packets: list[bytes] = []
    cport = 40000 + i
    cs, ss = 1000, 5000

    def out(payload: bytes, flags: int = TCP_ACK) -> None:
        nonlocal cs
        packets.append(build_tcp(client, SERVER, cport, 1723, cs, payload, flags=flags))
        cs += len(payload) + (1 if flags & TCP_SYN else 0)

    def inb(payload: bytes, flags: int = TCP_ACK) -> None:
        nonlocal ss
        packets.append(build_tcp(SERVER, client, 1723, cport, ss, payload, flags=flags))
        ss += len(payload) + (1 if flags & TCP_SYN else 0)

    out(b"", TCP_SYN)
    inb(b"", TCP_SYN | TCP_ACK)
    ocr = msg(MT.OUTGOING_CALL_REQUEST, call_id=CLIENT_CALL_ID, serial=i)
    if i == 0:  # the Outgoing-Call-Request split inside its Call ID field
        out(msg(MT.START_CONTROL_CONNECTION_REQUEST))
        inb(msg(MT.START_CONTROL_CONNECTION_REPLY))
        out(ocr[:13])
        out(ocr[13:])
    elif i == 1:  # one segment carrying two messages
        out(msg(MT.START_CONTROL_CONNECTION_REQUEST))
        inb(msg(MT.START_CONTROL_CONNECTION_REPLY))
        out(msg(MT.ECHO_REQUEST) + ocr)
    else:  # Start-Control-Connection-Request and the call request coalesced
        out(msg(MT.START_CONTROL_CONNECTION_REQUEST) + ocr[:100])
        inb(msg(MT.START_CONTROL_CONNECTION_REPLY))
        out(ocr[100:])
    inb(msg(MT.OUTGOING_CALL_REPLY, call_id=128 * i, peer_call_id=FIRST_PUBLIC + i))
    return packets


def write_pcap(path: Path, packets: list[bytes]) -> None:
    w = RawPcapWriter(str(path), linktype=101)
    w.write_header(None)
    for n, p in enumerate(packets):
        w.write_packet(p, sec=1_700_000_000, usec=n)
    w.close()


def tshark_rows(path: Path) -> list[dict[str, str]]:
    fields = ["ip.src", "ip.dst", "pptp.control_message_type", "pptp.call_id", "pptp.peer_call_id",
              "gre.key.call_id", "tcp.checksum.status", "ip.checksum.status"]
    cmd = [require_tool("tshark"), "-n", "-r", str(path), "-o", "tcp.check_checksum:TRUE",
           "-o", "ip.check_checksum:TRUE", "-T", "fields", "-E", "separator=;"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [dict(zip(fields, line.split(";"), strict=True)) for line in out.splitlines()]


def outgoing_call_ids(path: Path) -> list[int]:
    streams: dict[tuple[bytes, int], bytes] = {}
    for packet, _meta in RawPcapReader(str(path)):
        if packet[9] != 6 or packet[22:24] != b"\x06\xbb":  # TCP toward port 1723
            continue
        key = (packet[12:16], int.from_bytes(packet[20:22], "big"))
        streams[key] = streams.get(key, b"") + payload_of(packet)
    ids = []
    for data in streams.values():
        while data:
            length = int.from_bytes(data[:2], "big")
            m = PPTP(data[:length])
            if isinstance(m, PPTPOutgoingCallRequest):
                ids.append(int(m.call_id))
            data = data[length:]
    return ids


def test_replay_three_clients_same_call_id(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.pcap", tmp_path / "out.pcap"
    write_pcap(src, conversation())
    policy = Policy(public_address=ipaddress.IPv4Address(PUBLIC),
                    allocation=Allocation.SEQUENTIAL, call_id_first=FIRST_PUBLIC)
    out = io.StringIO()
    assert replay(str(src), str(dst), policy, out) == 0
    summary = out.getvalue()
    assert "dropped 0" in summary
    assert "calls mapped 3" in summary

    rows = tshark_rows(dst)
    assert all(r["ip.checksum.status"] == "1" for r in rows), rows  # 1 = good
    assert all(r["tcp.checksum.status"] in ("", "1") for r in rows), rows
    # tshark's PPTP dissector reads one message per segment and does not
    # reassemble, so the split and coalesced requests are read from the
    # reassembled client streams by scapy's PPTP layer, a second parser.
    assert sorted(outgoing_call_ids(dst)) == [1000, 1001, 1002]
    reply = str(int(MT.OUTGOING_CALL_REPLY))
    replies = [r for r in rows if r["pptp.control_message_type"] == reply]
    assert len(replies) == 3
    assert {int(r["pptp.peer_call_id"]) for r in replies} == {CLIENT_CALL_ID}
    gre = [r for r in rows if r["gre.key.call_id"]]
    inbound = {r["ip.dst"]: int(r["gre.key.call_id"]) for r in gre if r["ip.src"] == SERVER}
    assert inbound == dict.fromkeys(CLIENTS, CLIENT_CALL_ID)
    outbound = [r for r in gre if r["ip.dst"] == SERVER]
    assert {r["ip.src"] for r in outbound} == {PUBLIC}


def test_replay_guesses_public_address(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.pcap", tmp_path / "out.pcap"
    write_pcap(src, conversation())
    out = io.StringIO()
    assert replay(str(src), str(dst), Policy(allocation=Allocation.SEQUENTIAL,
                                              call_id_first=FIRST_PUBLIC), out) == 0
    assert "calls mapped 3" in out.getvalue()


def test_replay_public_address_flag(tmp_path: Path) -> None:
    """A capture without inbound GRE cannot tell the public address: the flag gives it."""
    src, dst = tmp_path / "in.pcap", tmp_path / "out.pcap"
    packets = [p for p in conversation() if not p.startswith(b"\x45") or p[12:16] !=
               ipaddress.IPv4Address(SERVER).packed or p[9] != 47]
    assert len(packets) == len(conversation()) - len(CLIENTS)  # no GRE from the server
    write_pcap(src, packets)
    policy = tmp_path / "policy.yaml"  # the crafted replies name public Call IDs 1000, ...
    policy.write_text(f"call_ids: {{first: {FIRST_PUBLIC}, allocation: sequential}}\n")
    without = natedit("replay", str(src), str(dst), "--policy", str(policy))
    assert without.returncode == 1
    assert "cannot tell the public address" in without.stderr
    assert "--public-address A" in without.stderr
    done = natedit("replay", str(src), str(dst), "--policy", str(policy),
                   "--public-address", PUBLIC)
    assert done.returncode == 0, done.stderr
    assert "calls mapped 3" in done.stdout
    outbound = [r for r in tshark_rows(dst) if r["gre.key.call_id"]]
    assert len(outbound) == len(CLIENTS)
    assert {r["ip.src"] for r in outbound} == {PUBLIC}
    bad = natedit("replay", str(src), str(dst), "--public-address", "not-an-address")
    assert bad.returncode == 2


def natedit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "natedit", *args], capture_output=True,
                          text=True, timeout=120)
