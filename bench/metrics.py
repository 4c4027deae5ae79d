"""Scrape time with many live calls: what one Prometheus scrape of the worker costs.

    .venv/bin/python -m bench.metrics [--calls N] [--rounds R] [--json FILE]

The calls are built through the core from packets (a control connection each: SYN,
Start-Control-Connection, Outgoing-Call-Request and Reply), so the table is the one a
worker holds.
Three figures, each the median and the best of R rounds:

* ``collect``: the collector alone (every family, one series per call);
* ``exposition``: collect plus the Prometheus text format (``generate_latest``);
* ``stall``: the longest a stand-in packet loop waits for the interpreter while a
  scrape runs in another thread: /calls encoded in one piece (as before issue 11
  item 6) and in pieces (as now), side by side, and a /metrics exposition;
* ``http``: a GET of /metrics through the worker's own HTTP server on loopback
  (process metrics included); ``http_gzip``: the same with the headers Prometheus
  sends (OpenMetrics, gzip).

Target from the metrics issue: a scrape with 10,000 live calls well under a second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

from prometheus_client import generate_latest

from bench.core import IN, OUT, SERVER, client, translator
from natedit import Allocation, metrics
from natedit.core.translator import Translator
from natedit.core.wire import TCP_ACK, TCP_SYN, build_control_message, build_tcp
from natedit.core.wire import MessageType as MT
from natedit.status import PolicyStatus


def live_calls(n: int) -> Translator:
    """A translator holding ``n`` established calls, one per control connection, each
    built from packets: SYN, SYN-ACK, Start-Control-Connection-Request and -Reply, then
    Outgoing-Call-Request and a connected Outgoing-Call-Reply (sequential public IDs)."""
    tr = translator(Allocation.SEQUENTIAL)
    handle = tr.handle_packet
    for i in range(n):
        c, port = client(i % 200), 20000 + i // 200  # one connection per (client, port)
        out_seq, in_seq = 1000, 5000
        handle(build_tcp(c, SERVER, port, 1723, out_seq - 1, flags=TCP_SYN), OUT, 0)
        handle(build_tcp(SERVER, c, 1723, port, in_seq - 1, flags=TCP_SYN | TCP_ACK), IN, 0)
        for d, message in (
            (OUT, build_control_message(MT.START_CONTROL_CONNECTION_REQUEST)),
            (IN, build_control_message(MT.START_CONTROL_CONNECTION_REPLY)),
            (OUT, build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)),
            (IN, build_control_message(MT.OUTGOING_CALL_REPLY, call_id=i,
                                       peer_call_id=i + 1)),
        ):
            if d is OUT:
                handle(build_tcp(c, SERVER, port, 1723, out_seq, message), d, 0)
                out_seq += len(message)
            else:
                handle(build_tcp(SERVER, c, 1723, port, in_seq, message), d, 0)
                in_seq += len(message)
    assert len(tr.table) == n and all(c.state == "established" for c in tr.calls())
    return tr


PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
"""What Prometheus 2.x sends with a scrape: OpenMetrics preferred, gzip."""


def timed(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(median, best) seconds of ``fn`` over ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def longest_stall(scrape: Callable[[], object]) -> tuple[float, float]:
    """(longest gap between two turns of a stand-in packet loop, scrape seconds) while
    ``scrape`` runs in another thread, as the HTTP server's does. The loop does what
    the worker's does between packets: a system call that lets go of the GIL
    (``time.sleep(0)``) and a little Python; a gap is the time it waited for the GIL."""
    done = threading.Event()
    took: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        scrape()
        took.append(time.perf_counter() - t0)
        done.set()

    thread = threading.Thread(target=run)
    longest, last = 0.0, time.perf_counter()
    thread.start()
    while not done.is_set():
        time.sleep(0)
        sum(range(20))
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    thread.join()
    return longest, took[0]


def stalls(collector: metrics.NateditCollector, registry: object, rounds: int
           ) -> dict[str, tuple[float, float]]:
    """Longest packet-loop stall (worst of ``rounds``) and scrape time (median): /calls
    as one json.dumps (before issue 11 item 6) and in CALLS_CHUNK pieces (now), side by
    side, and a /metrics exposition."""
    def one_shot() -> bytes:
        return json.dumps({"calls": collector.calls_json()}).encode()

    def chunked() -> bytes:
        return b"".join(metrics.calls_body(collector.calls_chunks()))

    def ids(body: bytes) -> list[int]:
        return [c["public_call_id"] for c in json.loads(body)["calls"]]

    assert ids(one_shot()) == ids(chunked())  # the same calls (times move on)
    out = {}
    for name, fn in (("no_scrape", lambda: time.sleep(0.3)),  # the machine's own noise
                     ("calls_one_shot", one_shot), ("calls_chunked", chunked),
                     ("metrics", lambda: generate_latest(registry))):  # type: ignore[arg-type]
        runs = [longest_stall(fn) for _ in range(rounds)]
        out[name] = (max(r[0] for r in runs), statistics.median(r[1] for r in runs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10_000, help="live calls (default 10,000)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    tr = live_calls(args.calls)
    collector = metrics.NateditCollector(tr, Counter(), PolicyStatus(), queue_maxlen=4096)
    registry = metrics.registry_for(collector)
    text = generate_latest(registry)
    series = text.count(b"\nnatedit_call_info{")
    rows: dict[str, tuple[float, float]] = {
        "collect": timed(lambda: list(registry.collect()), args.rounds),
        "exposition": timed(lambda: generate_latest(registry), args.rounds),
    }
    with metrics.MetricsServer("127.0.0.1:0", collector, registry=registry) as server:
        host, port = server.address
        url = f"http://{host}:{port}/metrics"

        def get(headers: dict[str, str]) -> bytes:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=10) as r:
                body: bytes = r.read()
            return body

        rows["http"] = timed(lambda: get({}), args.rounds)
        rows["http_gzip"] = timed(lambda: get(PROMETHEUS_HEADERS), args.rounds)
    stall = stalls(collector, registry, max(3, args.rounds // 4))
    print(f"{args.calls:,} live calls, {series:,} natedit_call_info series, "
          f"{len(text) / 1e6:.2f} MB per scrape")
    print(f"{'figure':<12}{'median ms':>12}{'best ms':>10}")
    for name, (median, best) in rows.items():
        print(f"{name:<12}{median * 1e3:>12.1f}{best * 1e3:>10.1f}")
    print(f"{'scrape':<16}{'longest stall ms':>18}{'scrape ms':>11}")
    for name, (longest, took) in stall.items():
        print(f"{name:<16}{longest * 1e3:>18.1f}{took * 1e3:>11.1f}")
    verdict = "met" if max(rows["http"][0], rows["http_gzip"][0]) < 1.0 else "MISSED"
    print(f"target: a scrape with 10,000 live calls well under 1 s: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "series": series, "bytes": len(text),
                       "seconds": {k: {"median": m, "best": b} for k, (m, b) in rows.items()},
                       "stall_seconds": {k: {"longest": x, "scrape": t}
                                         for k, (x, t) in stall.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
