"""Crafting helpers: a TCP 1723 conversation as the gateway's queue sees it.

Addresses: clients 10.0.0.0/24 (inside), server 198.51.100.2, gateway public
address 198.51.100.1 (documentation range).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass, field

from natedit import Direction, Policy, Verdict
from natedit._translator import Translator
from natedit._wire import (
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

    def open(self) -> None:
        self.feed(OUT, build_tcp(self.client, self.server, self.client_port, 1723,
                                 self.out_seq - 1, flags=TCP_SYN))
        self.feed(IN, build_tcp(self.server, self.client, 1723, self.client_port,
                                self.in_seq - 1, flags=TCP_SYN | TCP_ACK))

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
        v = self.tr.handle_packet(packet, d, self.now)
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
