"""Packet capture on a lab interface (tcpdump) and decoding with tshark.

tshark is a parser independent of natedit's own: it reassembles PPTP over TCP, splits
several messages in one segment, and decodes enhanced GRE.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from natedit.lab.topology import PPTP_PORT, SERVER_ADDR, Lab, LabError, which

DEFAULT_BPF = "tcp port 1723 or ip proto 47 or icmp"

PPTP_MESSAGE_NAMES: dict[int, str] = {
    1: "Start-Control-Connection-Request",
    2: "Start-Control-Connection-Reply",
    3: "Stop-Control-Connection-Request",
    4: "Stop-Control-Connection-Reply",
    5: "Echo-Request",
    6: "Echo-Reply",
    7: "Outgoing-Call-Request",
    8: "Outgoing-Call-Reply",
    9: "Incoming-Call-Request",
    10: "Incoming-Call-Reply",
    11: "Incoming-Call-Connected",
    12: "Call-Clear-Request",
    13: "Call-Disconnect-Notify",
    14: "WAN-Error-Notify",
    15: "Set-Link-Info",
}
OCRQ, OCRP, CCRQ, CDN, STOPCCRQ = 7, 8, 12, 13, 3

_RESULT_FIELDS = (
    "pptp.out_result",
    "pptp.in_result",
    "pptp.disc_result",
    "pptp.control_result",
    "pptp.stop_result",
    "pptp.echo_result",
)


@dataclass(frozen=True)
class GrePacket:
    frame: int
    time: float
    src: str
    dst: str
    call_id: int
    seq: int | None
    ack: int | None
    payload_len: int


@dataclass(frozen=True)
class PptpMessage:
    frame: int
    time: float
    src: str
    dst: str
    sport: int
    dport: int
    msg_type: int
    call_id: int | None
    peer_call_id: int | None
    result: int | None

    @property
    def name(self) -> str:
        return PPTP_MESSAGE_NAMES.get(self.msg_type, f"type-{self.msg_type}")


@dataclass(frozen=True)
class IcmpPacket:
    frame: int
    time: float
    src: str
    dst: str
    icmp_type: int
    code: int
    quoted_proto: int | None  # IP protocol of the quoted packet (47 = GRE)
    quoted_call_id: int | None  # GRE Call ID of the quoted packet


@dataclass
class WireSummary:
    """Everything PPTP-related seen on one interface."""

    gre: list[GrePacket] = field(default_factory=list)
    pptp: list[PptpMessage] = field(default_factory=list)
    icmp: list[IcmpPacket] = field(default_factory=list)
    # control-connection directions whose byte stream did not parse as PPTP
    malformed_streams: list[tuple[str, int, str, int]] = field(default_factory=list)

    def gre_call_ids(self, *, src: str | None = None, dst: str | None = None) -> set[int]:
        return {
            g.call_id
            for g in self.gre
            if (src is None or g.src == src) and (dst is None or g.dst == dst)
        }

    @property
    def gre_call_ids_to_server(self) -> set[int]:
        """Call IDs in client->server GRE (these are the server's Call IDs)."""
        return self.gre_call_ids(dst=SERVER_ADDR)

    @property
    def gre_call_ids_from_server(self) -> set[int]:
        """Call IDs in server->client GRE (the clients' public Call IDs)."""
        return self.gre_call_ids(src=SERVER_ADDR)

    def gre_count(self, *, src: str | None = None, dst: str | None = None) -> int:
        return sum(
            1 for g in self.gre if (src is None or g.src == src) and (dst is None or g.dst == dst)
        )

    def messages(self, msg_type: int) -> list[PptpMessage]:
        return [m for m in self.pptp if m.msg_type == msg_type]

    @property
    def pptp_call_ids(self) -> set[int]:
        """Every 'Call ID' field in PPTP control messages."""
        return {m.call_id for m in self.pptp if m.call_id is not None}

    @property
    def pptp_peer_call_ids(self) -> set[int]:
        """Every 'Peer's Call ID' field in PPTP control messages."""
        return {m.peer_call_id for m in self.pptp if m.peer_call_id is not None}

    @property
    def control_connections(self) -> set[tuple[str, int]]:
        """(client-side address, port) of each control connection seen."""
        conns: set[tuple[str, int]] = set()
        for m in self.pptp:
            if m.dport == 1723:
                conns.add((m.src, m.sport))
            elif m.sport == 1723:
                conns.add((m.dst, m.dport))
        return conns

    def message_counts(self) -> Counter[str]:
        return Counter(m.name for m in self.pptp)

    @property
    def icmp_unreachable_for_gre(self) -> int:
        return sum(1 for i in self.icmp if i.icmp_type == 3 and i.quoted_proto == 47)

    def describe(self) -> str:
        lines = [
            f"GRE to server: {self.gre_count(dst=SERVER_ADDR)} pkts, call ids "
            f"{sorted(self.gre_call_ids_to_server)}",
            f"GRE from server: {self.gre_count(src=SERVER_ADDR)} pkts, call ids "
            f"{sorted(self.gre_call_ids_from_server)}",
            f"ICMP: {len(self.icmp)} ({self.icmp_unreachable_for_gre} unreachable quoting GRE)",
        ]
        for m in self.pptp:
            lines.append(
                f"  {m.time:8.3f} {m.src}:{m.sport} -> {m.dst}:{m.dport} {m.name}"
                f" call_id={m.call_id} peer={m.peer_call_id} result={m.result}"
            )
        return "\n".join(lines)


# Offsets (from the start of a control message) of Call ID, Peer's Call ID and Result Code.
_PPTP_LAYOUT: dict[int, tuple[int | None, int | None, int | None]] = {
    2: (None, None, 14),  # SCCRP: result code after the protocol version
    4: (None, None, 12),  # StopCCRP
    6: (None, None, 16),  # Echo-Reply: after the identifier
    7: (12, None, None),  # OCRQ
    8: (12, 14, 16),  # OCRP
    9: (12, None, None),  # ICRQ
    10: (12, 14, 16),  # ICRP
    11: (None, 12, None),  # ICCN
    12: (12, None, None),  # CCRQ
    13: (12, None, 14),  # CDN
    14: (None, 12, None),  # WAN-Error-Notify
    15: (None, 12, None),  # Set-Link-Info
}
_MAGIC = b"\x1a\x2b\x3c\x4d"
_TSHARK_FIELDS = (
    "frame.number",
    "frame.time_relative",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.seq_raw",
    "tcp.flags.syn",
    "tcp.payload",
    "gre.key.call_id",
    "gre.sequence_number",
    "gre.ack_number",
    "gre.key.payload_length",
    "icmp.type",
    "icmp.code",
)


@dataclass
class _Segment:
    frame: int
    time: float
    seq: int
    payload: bytes


@dataclass
class _Direction:
    src: str
    dst: str
    sport: int
    dport: int
    syn_seq: int | None = None
    segments: list[_Segment] = field(default_factory=list)


def _first_int(values: list[str], default: int | None = None) -> int | None:
    for value in values:
        if value:
            try:
                return int(value, 16) if value.startswith("0x") else int(value)
            except ValueError:
                return default
    return default


def parse_control_stream(data: bytes) -> tuple[list[tuple[int, int]], bool]:
    """Split one direction of a PPTP control connection into messages by their Length.

    Returns ``[(start offset, length), ...]`` and whether the stream is malformed (a Length
    shorter than the header or a wrong magic cookie stops parsing).
    """
    out: list[tuple[int, int]] = []
    pos = 0
    while len(data) - pos >= 12:
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 12 or data[pos + 4 : pos + 8] != _MAGIC:
            return out, True
        if len(data) - pos < length:
            break
        out.append((pos, length))
        pos += length
    return out, False


def _pptp_messages(direction: _Direction) -> tuple[list[PptpMessage], bool]:
    """Reassemble one TCP direction (by sequence number) and parse its PPTP messages."""
    segs = sorted(direction.segments, key=lambda g: g.seq)
    if not segs:
        return [], False
    base = direction.syn_seq + 1 if direction.syn_seq is not None else segs[0].seq
    stream = bytearray()
    pieces: list[tuple[int, int, _Segment]] = []  # stream bytes [start, stop) came from seg
    for seg in segs:
        offset = (seg.seq - base) % (1 << 32)
        if offset > len(stream):
            break  # a gap (segment not captured): stop at what is contiguous
        new = seg.payload[len(stream) - offset :]
        if new:
            pieces.append((len(stream), len(stream) + len(new), seg))
            stream += new
    bounds, malformed = parse_control_stream(bytes(stream))
    messages: list[PptpMessage] = []
    for start, length in bounds:
        end = start + length
        # the message is complete once the last of its bytes has been captured
        seg = max((p for a, b, p in pieces if a < end and b > start), key=lambda p: p.frame)
        msg = bytes(stream[start:end])
        msg_type = int.from_bytes(msg[8:10], "big")
        cid_at, peer_at, res_at = _PPTP_LAYOUT.get(msg_type, (None, None, None))

        def u16(at: int | None, msg: bytes = msg) -> int | None:
            return (
                int.from_bytes(msg[at : at + 2], "big")
                if at is not None and at + 2 <= len(msg)
                else None
            )

        result = msg[res_at] if res_at is not None and res_at < len(msg) else None
        messages.append(
            PptpMessage(
                seg.frame,
                seg.time,
                direction.src,
                direction.dst,
                direction.sport,
                direction.dport,
                msg_type,
                u16(cid_at),
                u16(peer_at),
                result,
            )
        )
    return messages, malformed


def decode_pcap(path: Path) -> WireSummary:
    """Decode a pcap: GRE and ICMP with tshark; PPTP control messages with the harness's own
    framing (tshark's PPTP dissector only decodes the first message of each TCP segment
    and never reassembles), from the TCP payloads tshark extracts."""
    tshark = which("tshark") or "tshark"
    argv = [
        tshark,
        "-n",
        "-r",
        str(path),
        "-T",
        "fields",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
        "-E",
        "separator=/t",
        "-Y",
        "tcp or gre or icmp",
    ]
    for name in _TSHARK_FIELDS:
        argv += ["-e", name]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise LabError(f"tshark failed: {res.stderr.strip()}")
    summary = WireSummary()
    directions: dict[tuple[str, int, str, int], _Direction] = {}
    for line in res.stdout.splitlines():
        cols = line.split("\t")
        if len(cols) < len(_TSHARK_FIELDS):
            cols += [""] * (len(_TSHARK_FIELDS) - len(cols))
        f = {name: cols[i].split(",") for i, name in enumerate(_TSHARK_FIELDS)}
        number = _first_int(f["frame.number"], 0) or 0
        t = float(f["frame.time_relative"][0] or 0.0)
        src, dst = f["ip.src"][0], f["ip.dst"][0]
        if f["icmp.type"][0]:
            protos = f["ip.proto"]
            summary.icmp.append(
                IcmpPacket(
                    number,
                    t,
                    src,
                    dst,
                    _first_int(f["icmp.type"], 0) or 0,
                    _first_int(f["icmp.code"], 0) or 0,
                    _first_int(protos[1:]) if len(protos) > 1 else None,
                    _first_int(f["gre.key.call_id"]),
                )
            )
            continue
        call_id = _first_int(f["gre.key.call_id"])
        if call_id is not None:
            summary.gre.append(
                GrePacket(
                    number,
                    t,
                    src,
                    dst,
                    call_id,
                    _first_int(f["gre.sequence_number"]),
                    _first_int(f["gre.ack_number"]),
                    _first_int(f["gre.key.payload_length"], 0) or 0,
                )
            )
            continue
        sport, dport = _first_int(f["tcp.srcport"]), _first_int(f["tcp.dstport"])
        seq = _first_int(f["tcp.seq_raw"])
        if sport is None or dport is None or seq is None or PPTP_PORT not in (sport, dport):
            continue
        key = (src, sport, dst, dport)
        direction = directions.setdefault(key, _Direction(src, dst, sport, dport))
        if f["tcp.flags.syn"][0] in ("1", "True"):
            direction.syn_seq = seq
        payload = bytes.fromhex(f["tcp.payload"][0].replace(":", ""))
        if payload:
            direction.segments.append(_Segment(number, t, seq, payload))
    for direction in directions.values():
        messages, malformed = _pptp_messages(direction)
        summary.pptp.extend(messages)
        if malformed:
            summary.malformed_streams.append(
                (direction.src, direction.sport, direction.dst, direction.dport)
            )
    summary.pptp.sort(key=lambda m: (m.frame, m.time))
    return summary


class Capture:
    """tcpdump on a lab interface (default: the gateway's outside interface).

    ``with Capture(lab) as cap: ...`` then ``cap.summary``; or start()/stop().
    """

    def __init__(
        self,
        lab: Lab,
        *,
        ns: str | None = None,
        iface: str | None = None,
        name: str = "outside",
        bpf: str = DEFAULT_BPF,
    ) -> None:
        self.lab = lab
        self.ns = ns or lab.gw_ns
        self.iface = iface or lab.gw_outside_if
        self.path = lab.tmpdir / f"capture-{name}-{lab.serial()}.pcap"
        self.bpf = bpf
        self.proc: subprocess.Popen[bytes] | None = None
        self.summary: WireSummary | None = None

    def start(self, timeout: float = 5.0) -> Capture:
        argv = [
            which("tcpdump") or "tcpdump",
            "-i",
            self.iface,
            "-n",
            "-s",
            "0",
            "-w",
            str(self.path),
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            self.bpf,
        ]
        self.proc = self.lab.popen(self.ns, argv, name="tcpdump", stop_signal=signal.SIGINT)
        deadline = time.monotonic() + timeout
        while "listening on" not in self.lab.process_log(self.proc):
            if self.proc.poll() is not None:
                raise LabError(f"tcpdump exited: {self.lab.process_log(self.proc)}")
            if time.monotonic() > deadline:
                raise LabError("tcpdump did not start listening")
            time.sleep(0.01)
        return self

    def stop(self) -> WireSummary:
        if self.proc is None:
            raise LabError("capture not started")
        if self.summary is None:
            self.lab.stop_process(self.proc, signal.SIGINT, 3.0)
            self.summary = decode_pcap(self.path)
        return self.summary

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.summary is None:
            self.stop()
