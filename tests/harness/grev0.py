"""GRE version 0 peers on raw sockets (this kernel has no CONFIG_NET_IPGRE).

Run inside a lab namespace with the interpreter, as a file (it imports nothing of
the project)::

    python grev0.py echo                 # echo every request back to its sender
    python grev0.py send DST --count N   # N requests to DST; prints a JSON report

A request is a GRE v0 packet (half of them with the Key bit and a key, like a keyed
tunnel; protocol 0x88B5, the local experimental EtherType) whose payload is
``NEG0Q`` + tag + seq + filler; the echo sends the same GRE header back with ``Q``
turned into ``R``. The sender counts the replies that come back byte for byte as
expected (``intact``) and the bytes sent and received (GRE header and payload).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

PROTO_GRE = 47
ETHERTYPE = 0x88B5
REQUEST = b"NEG0Q"
REPLY = b"NEG0R"
KEY_BIT = 0x2000


def packet(tag: bytes, seq: int, marker: bytes = REQUEST) -> bytes:
    filler = bytes((seq * 7 + i * 13) & 0xFF for i in range(16 + seq % 48))
    payload = marker + tag + struct.pack("!I", seq) + filler
    if seq % 2:
        return struct.pack("!HHI", KEY_BIT, ETHERTYPE, 0x10000 + seq) + payload
    return struct.pack("!HH", 0, ETHERTYPE) + payload


def _gre(data: bytes) -> tuple[str, bytes] | None:
    """(source address, GRE header + payload) of a received IPv4 datagram."""
    if len(data) < 20:
        return None
    ihl = (data[0] & 0x0F) * 4
    return socket.inet_ntoa(data[12:16]), data[ihl:]


def _payload_at(gre: bytes) -> int:
    flags = struct.unpack_from("!H", gre)[0]
    return 8 if flags & KEY_BIT else 4


def echo() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, PROTO_GRE)
    echoed = 0

    def stop(signum: int, frame: object) -> None:
        print(f"echoed {echoed}", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        got = _gre(sock.recv(65535))
        if got is None or len(got[1]) < 4:
            continue
        src, gre = got
        if struct.unpack_from("!H", gre)[0] & 0x7:  # version 0 only
            continue
        at = _payload_at(gre)
        if gre[at : at + len(REQUEST)] != REQUEST:
            continue
        sock.sendto(gre[:at] + REPLY + gre[at + len(REQUEST) :], (src, 0))
        echoed += 1


def send(dst: str, count: int, timeout: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, PROTO_GRE)
    tag = secrets.token_bytes(4)
    expected = {seq: packet(tag, seq, REPLY) for seq in range(count)}
    report: dict[str, Any] = {"dst": dst, "sent": 0, "bytes_sent": 0, "received": 0, "intact": 0,
              "bytes_received": 0, "other_sources": 0}
    intact: set[int] = set()

    def read(wait: float) -> None:
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            ready, _, _ = select.select([sock], [], [], max(0.0, left))
            if not ready:
                return
            got = _gre(sock.recv(65535))
            if got is None or len(got[1]) < 4:
                continue
            src, gre = got
            at = _payload_at(gre)
            if gre[at : at + len(REPLY) + 4] != REPLY + tag:
                continue
            if src != dst:
                report["other_sources"] += 1
                continue
            report["received"] += 1
            report["bytes_received"] += len(gre)
            (seq,) = struct.unpack_from("!I", gre, at + len(REPLY) + 4)
            if expected.get(seq) == gre:
                intact.add(seq)

    for seq in range(count):
        data = packet(tag, seq)
        sock.sendto(data, (dst, 0))
        report["sent"] += 1
        report["bytes_sent"] += len(data)
        if seq % 20 == 19:
            read(0.002)
    deadline = time.monotonic() + timeout
    while len(intact) < count and time.monotonic() < deadline:
        read(0.05)
    report["intact"] = len(intact)
    json.dump(report, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("echo")
    p_send = sub.add_parser("send")
    p_send.add_argument("dst")
    p_send.add_argument("--count", type=int, default=100)
    p_send.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.mode == "echo":
        return echo()
    return send(args.dst, args.count, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
