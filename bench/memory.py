"""Memory of the call table: bytes per live call, the ceiling, the worst a connection holds.

    .venv/bin/python -m bench.memory [--calls 65535] [--json FILE]

Calls are built through ``Translator.handle_packet`` exactly as the worker
sees them (SYN, SYN-ACK, Start-Control-Connection-Request and -Reply,
Outgoing-Call-Request and -Reply), one control connection per call as
pptp-linux and Windows make them. Python allocations are measured with
``tracemalloc`` (what the table holds, nothing else), the process with
VmRSS. Figures:

* bytes per live call (with its control connection), at 1,000 calls and at
  the ceiling;
* the ceiling: 65,535 calls to one server, the whole public Call ID range
  (256 clients x 256 calls: ``max_calls_per_client`` is 256 by default;
  ``max_control_connections`` raised to 65,535 for one connection per call),
  and the next request refused;
* the state file at the ceiling: its size, the time to write it whole and to
  restore every call from it (a restart at the ceiling);
* the worst one control connection can hold: both streams' retransmission
  memory full (``EDIT_BACKLOG`` rewritten bytes each), times the connection
  limit: the bound on what hostile control traffic can make natedit keep.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

from natedit import CallEstablished, CallMapped, Direction, MessageType, Policy
from natedit.core.stream import EDIT_BACKLOG
from natedit.core.translator import Translator
from natedit.core.wire import TCP_ACK, TCP_SYN, build_control_message, build_tcp
from natedit.state import StateStore

PUBLIC, SERVER = "198.51.100.1", "198.51.100.2"
OUT, IN = Direction.OUTBOUND, Direction.INBOUND
MT = MessageType
CALLS_PER_CLIENT = 256


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def policy(calls: int) -> Policy:
    return Policy(public_address=ipaddress.IPv4Address(PUBLIC), max_calls=65535,
                  max_calls_per_client=CALLS_PER_CLIENT,
                  max_control_connections=max(calls + 16, 16384))


def client(i: int) -> str:
    return str(ipaddress.IPv4Address("10.1.0.0") + i // CALLS_PER_CLIENT + 1)


def set_up(tr: Translator, i: int) -> bool:
    """Call number ``i``: client i // 256, TCP port 20000 + i % 256, Call ID 0x1234."""
    c, port = client(i), 20000 + i % CALLS_PER_CLIENT
    start = build_control_message(MT.START_CONTROL_CONNECTION_REQUEST)
    reply = build_control_message(MT.START_CONTROL_CONNECTION_REPLY)
    h = tr.handle_packet
    h(build_tcp(c, SERVER, port, 1723, 999, flags=TCP_SYN), OUT, 0)
    h(build_tcp(SERVER, c, 1723, port, 4999, flags=TCP_SYN | TCP_ACK), IN, 0)
    h(build_tcp(c, SERVER, port, 1723, 1000, start), OUT, 0)
    h(build_tcp(SERVER, c, 1723, port, 5000, reply), IN, 0)
    v = h(build_tcp(c, SERVER, port, 1723, 1000 + len(start),
                    build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)), OUT, 0)
    mapped = [e for e in v.events if isinstance(e, CallMapped)]
    if not mapped:  # (the public Call ID may equal 0x1234: then no byte changes)
        return False
    public = mapped[0].call.public_call_id
    v = h(build_tcp(SERVER, c, 1723, port, 5000 + len(reply), build_control_message(
        MT.OUTGOING_CALL_REPLY, call_id=i & 0xFFFF, peer_call_id=public)), IN, 0)
    return v.accepted and any(isinstance(e, CallEstablished) for e in v.events)


def measure_calls(n: int, *, trace: bool = True) -> tuple[Translator, dict[str, float]]:
    """Build ``n`` calls. ``trace``: count Python allocations (tracemalloc, slow, and its
    own bookkeeping inflates RSS); else the process's RSS growth and the build time."""
    gc.collect()
    rss0 = rss_kib()
    if trace:
        tracemalloc.start()
        base = tracemalloc.take_snapshot()
    tr = Translator(policy(n), rng=random.Random(1))
    t0 = time.perf_counter()
    for i in range(n):
        assert set_up(tr, i), f"call {i} was not set up"
    seconds = time.perf_counter() - t0
    gc.collect()
    assert len(tr.table) == n and len(tr.table.connections) == n
    if not trace:
        return tr, {"calls": n, "rss_delta_mib": round((rss_kib() - rss0) / 1024, 1),
                    "rss_bytes_per_call": round((rss_kib() - rss0) * 1024 / n),
                    "set_up_seconds": round(seconds, 1)}
    held = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    return tr, {"calls": n, "bytes_per_call": round(held / n),
                "table_mib": round(held / 2**20, 1)}


def ceiling(n: int) -> dict[str, object]:
    tr, figures = measure_calls(n, trace=False)
    out: dict[str, object] = dict(figures)
    # one more request, from a client with room: the pool (one server) is full
    i = n + CALLS_PER_CLIENT * 300
    out["next_call_set_up"] = set_up(tr, i)
    out["next_call_refused"] = dict(tr.stats.calls_refused)
    out["ids_in_use"] = len(tr.table.used[(ipaddress.IPv4Address(PUBLIC).packed,
                                           ipaddress.IPv4Address(SERVER).packed)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        store, _ = StateStore.open(path, identity="bench")
        records = tr.snapshot()
        t0 = time.perf_counter()
        store.replace_all(records, time.time())
        out["state_write_seconds"] = round(time.perf_counter() - t0, 2)
        store.close()
        out["state_file_bytes"] = sum(p.stat().st_size for p in Path(tmp).iterdir())
        out["state_bytes_per_call"] = round(out["state_file_bytes"] / n)  # type: ignore[operator]
        t0 = time.perf_counter()
        store, loaded = StateStore.open(path, identity="bench")
        fresh = Translator(policy(n), rng=random.Random(2))
        outcome = fresh.restore(loaded.records, 0.0)
        out["state_restore_seconds"] = round(time.perf_counter() - t0, 2)
        out["restored"] = outcome["restored"]
        store.close()
    return out


def hostile_connection() -> dict[str, object]:
    """One connection whose two streams remember EDIT_BACKLOG rewritten bytes each."""
    tr = Translator(policy(1), rng=random.Random(3))
    assert set_up(tr, 0)
    (conn,) = tr.table.connections.values()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    for stream in conn.streams:
        for k in range(EDIT_BACKLOG):
            stream.record(1_000_000 + 2 * k, k & 0xFF)
    gc.collect()
    held = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    limit = Policy(public_address=ipaddress.IPv4Address(PUBLIC)).max_control_connections
    return {
        "edit_backlog": EDIT_BACKLOG,
        "bytes_per_full_connection": held,
        "connections_limit": limit,
        "worst_case_mib": round(held * limit / 2**20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=65535)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    rows: dict[str, object] = {}
    rows["typical_1000"] = measure_calls(1000)[1]
    rows["ceiling"] = ceiling(args.calls)
    rows["ceiling_traced"] = measure_calls(args.calls)[1]
    rows["hostile_connection"] = hostile_connection()
    for name, figures in rows.items():
        print(f"{name}: {json.dumps(figures)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
