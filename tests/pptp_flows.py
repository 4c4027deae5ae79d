"""Crafting helpers: a TCP 1723 conversation as the gateway's queue sees it.

Addresses: clients 10.0.0.0/24 (inside), server 198.51.100.2, gateway public
address 198.51.100.1 (documentation range).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from natedit import Direction, Policy, Verdict
from natedit.core.calls import Call
from natedit.core.checksum import internet_checksum
from natedit.core.table import (
    CLIENT_HI,
    CLIENT_ID,
    PUBLIC_HI,
    PUBLIC_ID,
    SERVER_HI,
    SERVER_ID,
    CallTable,
    ControlConnection,
)
from natedit.core.translator import Translator
from natedit.core.wire import (
    TCP_ACK,
    TCP_SYN,
    MessageType,
    build_control_message,
    build_gre,
    build_tcp,
)

PUBLIC = "198.51.100.1"
SERVER = "198.51.100.2"
OUT = Direction.OUTBOUND
IN = Direction.INBOUND


def make_translator(**kw: object) -> Translator:
    policy = Policy(public_address=ipaddress.IPv4Address(PUBLIC), **kw)  # type: ignore[arg-type]
    return Translator(policy, rng=random.Random(1723))


@dataclass
class Conversation:
    """One control connection; ``send``/``recv`` build in-order segments."""

    tr: Translator
    client: str
    client_port: int = 40000
    server: str = SERVER
    out_seq: int = 1000
    in_seq: int = 5000
    now: float = 0.0
    verdicts: list[Verdict] = field(default_factory=list)
    public: bytes | None = None
    """The address the edge says the connection is NATed to (None: it says none)."""

    def open(self, *, start: bool = True) -> None:
        """SYN, SYN-ACK and (``start``) Start-Control-Connection-Request and -Reply, so
        that calls may be set up; ``out_seq``/``in_seq`` are then the next bytes."""
        hello = build_control_message(MessageType.START_CONTROL_CONNECTION_REQUEST)
        reply = build_control_message(MessageType.START_CONTROL_CONNECTION_REPLY)
        if start:  # keep out_seq/in_seq as they were: tests name absolute numbers
            self.out_seq -= len(hello)
            self.in_seq -= len(reply)
        self.feed(OUT, build_tcp(self.client, self.server, self.client_port, 1723,
                                 self.out_seq - 1, flags=TCP_SYN))
        self.feed(IN, build_tcp(self.server, self.client, 1723, self.client_port,
                                self.in_seq - 1, flags=TCP_SYN | TCP_ACK))
        if start:
            for d, message in ((OUT, hello), (IN, reply)):
                self.send(d, message)

    def segment(self, d: Direction, payload: bytes, *, seq: int | None = None,
                flags: int = TCP_ACK) -> bytes:
        if d is OUT:
            s = self.out_seq if seq is None else seq
            return build_tcp(self.client, self.server, self.client_port, 1723, s, payload,
                             flags=flags)
        s = self.in_seq if seq is None else seq
        return build_tcp(self.server, self.client, 1723, self.client_port, s, payload,
                         flags=flags)

    def send(self, d: Direction, payload: bytes, flags: int = TCP_ACK) -> Verdict:
        """An in-order segment; advances the sender's sequence number."""
        v = self.feed(d, self.segment(d, payload, flags=flags))
        if v.accepted:
            if d is OUT:
                self.out_seq += len(payload)
            else:
                self.in_seq += len(payload)
        return v

    def feed(self, d: Direction, packet: bytes) -> Verdict:
        v = (self.tr.handle_packet(packet, d, self.now) if self.public is None
             else self.tr.handle_packet(packet, d, self.now, self.public))
        self.verdicts.append(v)
        return v


def msg(mt: MessageType, **kw: int) -> bytes:
    return build_control_message(mt, **kw)


def payload_of(packet: bytes) -> bytes:
    ihl = (packet[0] & 0x0F) * 4
    doff = (packet[ihl + 12] >> 4) * 4
    return packet[ihl + doff :]


def out_bytes(v: Verdict, original: bytes) -> bytes:
    assert v.accepted, v
    return v.data if v.data is not None else original


def u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("!H", b, off)[0])


def gre_in(call_id: int, payload: bytes = b"\xff\x03\xc0\x21", server: str = SERVER) -> bytes:
    return build_gre(server, PUBLIC, call_id, payload)


def gre_out(client: str, server_call_id: int, payload: bytes = b"\xff\x03\xc0\x21") -> bytes:
    return build_gre(client, SERVER, server_call_id, payload)


# -- additions for the protocol-core suite ---------------------------------------------

Flight = tuple[Direction, bytes]
"""Bytes one side sends in a row (one or more whole messages), in conversation order."""


def forward(conv: Conversation, d: Direction, payload: bytes) -> bytes:
    """Send an in-order segment that must be accepted; the packet as it leaves."""
    packet = conv.segment(d, payload)
    v = conv.send(d, payload)
    return out_bytes(v, packet)


def establish(conv: Conversation, client_call_id: int, server_call_id: int) -> int:
    """Outgoing-Call-Request out, a connected Outgoing-Call-Reply in; the public Call ID."""
    ocrq = forward(conv, OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=client_call_id))
    public = u16(payload_of(ocrq), 12)
    ocrp = forward(conv, IN, msg(MessageType.OUTGOING_CALL_REPLY, call_id=server_call_id,
                                 peer_call_id=public))
    assert u16(payload_of(ocrp), 14) == client_call_id
    return public


def ip_checksum_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return internet_checksum(packet[:ihl]) == 0


def tcp_checksum_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    total = u16(packet, 2)
    seg = packet[ihl:total]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return internet_checksum(pseudo + seg) == 0


def deliver(conv: Conversation, d: Direction, segments: list[bytes]) -> bytes:
    """Feed in-order segments that must all be accepted; the payload bytes that leave."""
    out = b""
    for seg in segments:
        packet = forward(conv, d, seg)
        assert tcp_checksum_ok(packet) and ip_checksum_ok(packet)
        out += payload_of(packet)
    return out


def run_flights(flights: list[Flight], cut: list[list[bytes]] | None = None, *,
                client: str = "10.0.0.5", **policy: object) -> tuple[bytes, bytes, Translator]:
    """Play ``flights`` on a fresh translator (same seed every time).

    ``cut[i]`` is how flight ``i`` is segmented (default: one segment). Returns the
    outbound and inbound byte streams as they leave the gateway, and the translator.
    """
    tr = make_translator(**policy)
    conv = Conversation(tr, client)
    conv.open()
    streams = {OUT: b"", IN: b""}
    for i, (d, data) in enumerate(flights):
        segments = cut[i] if cut is not None else [data]
        assert b"".join(segments) == data
        streams[d] += deliver(conv, d, segments)
    return streams[OUT], streams[IN], tr


def split_messages(stream: bytes) -> list[bytes]:
    """Cut a byte stream of whole control messages by their Length fields."""
    out = []
    i = 0
    while i < len(stream):
        n = u16(stream, i)
        out.append(stream[i : i + n])
        i += n
    assert i == len(stream)
    return out


def run_timers(tr: Translator, until: float) -> list[object]:
    """Virtual time: fire every deadline up to ``until``; the events, in order."""
    events: list[object] = []
    while (due := tr.next_deadline()) is not None and due <= until:
        events.extend(tr.handle_timer(due))
    events.extend(tr.handle_timer(until))
    return events


def write_pcap(path: str, packets: list[bytes]) -> None:
    """A classic pcap of raw IPv4 packets (LINKTYPE_RAW = 101), 1 ms apart."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, p in enumerate(packets):
            f.write(struct.pack("<IIII", 1_700_000_000, i * 1000, len(p), len(p)))
            f.write(p)


def assert_table_consistent(table: CallTable, *, one_to_one: bool = True) -> None:
    """The call table's indexes agree with each other and with every connection's calls.

    ``one_to_one``: also check the high-byte rule in every connection (the table may
    relax it, and counts when it does in ``table.relaxed``).
    """
    live = [c for conn in table.connections.values() for c in conn.calls]
    assert sorted(map(id, live)) == sorted(map(id, table.by_public.values()))
    for (pub, server, cid), call in table.by_public.items():
        assert (pub, server, cid) == (call.public_ip, call.server_ip, call.public_call_id)
        assert not call.released and not call.conn.released
    per_pool = Counter((c.public_ip, c.server_ip, c.public_call_id) for c in live)
    assert all(n == 1 for n in per_pool.values()), "duplicate live public Call ID"
    for (pub, server), used in table.used.items():
        assert used == {c.public_call_id for c in live
                        if (c.public_ip, c.server_ip) == (pub, server)}
    assert table.per_client == Counter(c.client_ip for c in live)
    assert table.connections_per_client == Counter(k[0] for k in table.connections)
    for key, call in table.by_server.items():
        assert key == (call.client_ip, call.server_ip, call.server_call_id)
        assert not call.released
    for key, waiting in table._shadowed.items():  # live calls sharing a held key
        assert waiting and key in table.by_server
        for call in waiting:
            assert key == (call.client_ip, call.server_ip, call.server_call_id)
            assert not call.released and call is not table.by_server[key]
    with_key = [c for c in live if c.server_call_id is not None]
    assert len(with_key) == len(table.by_server) + sum(map(len, table._shadowed.values()))
    for conn in table.connections.values():
        assert high_bytes_one_to_one(conn) or not one_to_one, (
            "client and public high bytes are not one-to-one")
        for call in conn.calls:
            assert call.client_call_id is None or call.client_call_id >> 8 == call.client_call_hi
        assert_indexes_walk(conn)


KEYS: dict[int, Callable[[Call], int | None]] = {
    CLIENT_ID: lambda c: c.client_call_id,
    PUBLIC_ID: lambda c: c.public_call_id,
    SERVER_ID: lambda c: c.server_call_id,
    CLIENT_HI: lambda c: c.client_call_hi,
    PUBLIC_HI: lambda c: c.public_call_id >> 8,
    SERVER_HI: lambda c: None if c.server_call_id is None else c.server_call_id >> 8,
}
"""The kinds of key a connection indexes its calls by (``ControlConnection.index``)."""


def walk(conn: ControlConnection, kind: int) -> dict[int, list[Call]]:
    """``conn``'s calls by one kind of key (of :data:`KEYS`), each value's in the
    connection's order: what its index must hold, found by walking its calls."""
    out: dict[int, list[Call]] = {}
    for call in conn.calls:
        value = KEYS[kind](call)
        if value is not None:
            out.setdefault(value, []).append(call)
    return out


def assert_indexes_walk(conn: ControlConnection) -> None:
    """The index of ``conn`` holds exactly its calls, each key's in the connection's
    order, and its lookups find what a walk of its calls in order finds first (and
    None for a value no call has)."""
    assert list(conn.calls.values()) == sorted(conn.calls.values())
    assert conn.next_order > max(conn.calls.values(), default=-1)
    lookups: dict[int, Callable[[int], Call | None]] = {
        CLIENT_ID: conn.call_by_client_id, PUBLIC_ID: conn.call_by_public_id,
        SERVER_ID: conn.call_by_server_id}
    found = {kind: walk(conn, kind) for kind in KEYS}
    expected: dict[int, list[Call]] = {kind | v: calls for kind, by in found.items()
                                       for v, calls in by.items()}
    assert {k: list(conn.calls_with(k)) for k in conn.index} == expected
    for key, held in conn.index.items():  # one call alone, several as a list
        assert isinstance(held, Call) or len(held) > 1, f"{key:#x}: {held}"
    for kind, lookup in lookups.items():
        assert all(lookup(v) is calls[0] for v, calls in found[kind].items()), kind
        near = {0, 0xFFFF} | {v ^ bit for v in found[kind] for bit in (1, 0x100)}
        assert all(lookup(v) is None for v in near - found[kind].keys()), kind
    by_client, by_public = found[CLIENT_HI], found[PUBLIC_HI]
    for hi in range(0x100):
        assert conn.public_hi_for_client_hi(hi) == (
            by_client[hi][0].public_call_id >> 8 if hi in by_client else None)
        assert conn.client_hi_for_public_hi(hi) == (
            by_public[hi][0].client_call_hi if hi in by_public else None)
        assert conn.public_his_for_client_hi(hi) == {
            c.public_call_id >> 8 for c in by_client.get(hi, [])}
        assert conn.client_his_for_public_hi(hi) == {
            c.client_call_hi for c in by_public.get(hi, [])}
        assert conn.uses_public_hi(hi) == (hi in by_public)


def high_bytes_one_to_one(conn: ControlConnection) -> bool:
    """Whether ``conn``'s calls keep the high-byte rule: they share a client Call ID high
    byte exactly when they share a public one."""
    pairs = {(c.client_call_hi, c.public_call_id >> 8) for c in conn.calls}
    return len({hi for hi, _ in pairs}) == len(pairs) == len({p for _, p in pairs})
