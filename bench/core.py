"""In-process core benchmark: GRE packets and call set-ups per second, one core.

    .venv/bin/python -m bench.core [--seconds S] [--json FILE] [--setups N]

Each figure is the best of several timed rounds; scapy doing the same GRE
rewrite is measured in the same run for a side-by-side ratio (scapy is
what the per-packet path must not use). Targets from the core issue:
>= 300,000 GRE packets/s (issue 4) and >= 25,000 call set-ups (request + reply)/s
(issue 15: each message's call resolved once).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import time
from collections.abc import Callable
from functools import partial

from natedit import Allocation, Direction, Policy
from natedit.core.translator import Translator
from natedit.core.wire import (
    TCP_ACK,
    TCP_SYN,
    MessageType,
    build_control_message,
    build_gre,
    build_tcp,
)

PUBLIC, SERVER = "198.51.100.1", "198.51.100.2"
OUT, IN = Direction.OUTBOUND, Direction.INBOUND
LIVE_CALLS = 1000


def client(i: int) -> str:
    return str(ipaddress.IPv4Address("10.0.0.0") + 10 + i)


def translator(allocation: Allocation = Allocation.RANDOM) -> Translator:
    policy = Policy(public_address=ipaddress.IPv4Address(PUBLIC), allocation=allocation,
                    max_calls_per_client=65535, max_control_connections=65535)
    return Translator(policy, rng=random.Random(7))


def setup_packets(n: int, first_public: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """SYN, SYN-ACK, Start-Control-Connection-Request (untimed), and call
    request/reply pairs for ``n`` connections."""
    opens, requests, replies = [], [], []
    for i in range(n):
        c, port = client(i % 200), 20000 + i
        start = build_control_message(MessageType.START_CONTROL_CONNECTION_REQUEST)
        opens.append(build_tcp(c, SERVER, port, 1723, 999, flags=TCP_SYN))
        opens.append(build_tcp(SERVER, c, 1723, port, 4999, flags=TCP_SYN | TCP_ACK))
        opens.append(build_tcp(c, SERVER, port, 1723, 1000, start))
        requests.append(build_tcp(c, SERVER, port, 1723, 1000 + len(start),
                                  build_control_message(MessageType.OUTGOING_CALL_REQUEST,
                                                        call_id=0x1234)))
        replies.append(build_tcp(SERVER, c, 1723, port, 5000, build_control_message(
            MessageType.OUTGOING_CALL_REPLY, call_id=i, peer_call_id=first_public + i)))
    return opens, requests, replies


def established(n: int) -> tuple[Translator, list[int]]:
    tr = translator(Allocation.SEQUENTIAL)
    opens, requests, replies = setup_packets(n, 1)
    for p in opens:
        tr.handle_packet(p, IN if p[12:16] == ipaddress.IPv4Address(SERVER).packed else OUT, 0)
    for q, r in zip(requests, replies, strict=True):
        assert tr.handle_packet(q, OUT, 0).data is not None
        assert tr.handle_packet(r, IN, 0).data is not None
    assert len(tr.table) == n
    return tr, [c.public_call_id for c in tr.calls()]


def rate(fn: Callable[[], int], seconds: float, rounds: int = 5) -> float:
    """Best items/second over ``rounds`` rounds of about seconds/rounds each."""
    best = 0.0
    for _ in range(rounds):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / rounds:
            done += fn()
        best = max(best, done / (time.perf_counter() - t0))
    return best


def bench_gre(size: int, direction: Direction, seconds: float) -> float:
    tr, pubs = established(LIVE_CALLS)
    payload = bytes(size)
    if direction is IN:
        packets = [build_gre(SERVER, PUBLIC, pubs[i], payload) for i in range(LIVE_CALLS)]
    else:
        packets = [build_gre(client(i % 200), SERVER, i, payload) for i in range(LIVE_CALLS)]
    handle = tr.handle_packet

    def batch() -> int:
        for p in packets:
            handle(p, direction, 1.0)
        return len(packets)

    assert handle(packets[0], direction, 1.0).data is not None
    return rate(batch, seconds)


def bench_scapy_gre(size: int, seconds: float) -> float:
    from scapy.layers.inet import IP
    from scapy.layers.l2 import GRE  # noqa: F401 - registers GRE under IP

    packet = build_gre(SERVER, PUBLIC, 1000, bytes(size))

    def one() -> int:
        pkt = IP(packet)
        pkt.dst = "10.0.0.11"
        pkt.payload.call_id = 0x1234
        del pkt.chksum
        bytes(pkt)
        return 1

    return rate(one, seconds)


def bench_setups(seconds: float, n: int = 20000) -> float:
    best = 0.0
    for _ in range(3):
        tr = translator(Allocation.SEQUENTIAL)
        opens, requests, replies = setup_packets(n, 1)
        server = ipaddress.IPv4Address(SERVER).packed
        for p in opens:
            tr.handle_packet(p, IN if p[12:16] == server else OUT, 0)
        handle = tr.handle_packet
        t0 = time.perf_counter()
        for q, r in zip(requests, replies, strict=True):
            handle(q, OUT, 0)
            handle(r, IN, 0)
        best = max(best, n / (time.perf_counter() - t0))
        assert len(tr.table) == n and all(c.state == "established" for c in tr.calls())
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per figure")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--setups", type=int, default=20000,
                    help="call set-ups per round of that figure (default 20000)")
    args = ap.parse_args()
    figures: dict[str, Callable[[], float]] = {}
    for size in (64, 1400):
        figures[f"gre_in_{size}B_pps"] = partial(bench_gre, size, IN, args.seconds)
        figures[f"gre_out_{size}B_pps"] = partial(bench_gre, size, OUT, args.seconds)
    figures["scapy_gre_in_64B_pps"] = partial(bench_scapy_gre, 64, args.seconds)
    figures["call_setups_per_s"] = partial(bench_setups, args.seconds, args.setups)
    rows: dict[str, float] = {}
    for n, (name, measure) in enumerate(figures.items(), 1):
        # progress on stderr, as each figure is measured (the table goes to stdout)
        print(f"[bench] {n}/{len(figures)} {name} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rows[name] = measure()
        print(f" {rows[name]:,.0f}/s ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    ratio = rows["gre_in_64B_pps"] / rows["scapy_gre_in_64B_pps"]
    print(f"{'figure':<26}{'per second':>14}")
    for k, v in rows.items():
        print(f"{k:<26}{v:>14,.0f}")
    print(f"core / scapy (GRE in, 64 B): {ratio:.0f}x")
    targets = {"gre_in_64B_pps": 300_000, "gre_out_64B_pps": 300_000,
               "call_setups_per_s": 25_000}
    for k, t in targets.items():
        print(f"target {k} >= {t:,}: {'met' if rows[k] >= t else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": rows, "core_over_scapy": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
