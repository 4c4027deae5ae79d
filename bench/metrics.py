"""Scrape time with many live calls: what one Prometheus scrape of the worker costs.

    .venv/bin/python -m bench.metrics [--calls N] [--rounds R] [--json FILE]

The calls are built through the core from packets (a control connection each: SYN,
Start-Control-Connection, Outgoing-Call-Request and Reply), so the table is the one a
worker holds.
Three figures, each the median and the best of R rounds:

* ``collect``: the collector alone (every family, one series per call);
* ``exposition``: collect plus the Prometheus text format (``generate_latest``);
* ``stall``: the longest a stand-in packet loop waits for the interpreter while a
  scrape runs in another thread, and the longest the scraping thread ran within one
  such wait (the *hold*; the gap also holds the machine's other work), before and
  now side by side (:func:`stalls`): /calls in one piece, in 256-call pieces, and
  /metrics under Python's 5 ms switch interval; /calls and /metrics as the worker
  serves them now (``metrics.SWITCH_INTERVAL``, the interpreter let go between pieces,
  no garbage collection during a scrape);
* ``http``: a GET of /metrics through the worker's own HTTP server on loopback
  (process metrics included); ``http_gzip``: the same with the headers Prometheus
  sends (OpenMetrics, gzip).

Target from the metrics issue: a scrape with 10,000 live calls well under a second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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


def longest_stall(scrape: Callable[[], object]) -> tuple[float, float, float]:
    """(longest gap between two turns of a stand-in packet loop, the most CPU the
    scraping thread used within one gap, scrape seconds) while ``scrape`` runs in
    another thread, as the HTTP server's does. The loop does what the worker's does
    between packets: a system call that lets go of the GIL (``time.sleep(0)``) and a
    little Python; a gap is the time it waited for the GIL (and for a CPU: on a
    shared machine the gaps include other processes' turns, which the scraping
    thread's CPU time within a gap, the *hold*, leaves out)."""
    done = threading.Event()
    took: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        scrape()
        took.append(time.perf_counter() - t0)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert thread.ident is not None
    clock = time.pthread_getcpuclockid(thread.ident)
    longest = hold = 0.0
    last, last_cpu = time.perf_counter(), time.clock_gettime(clock)
    while not done.is_set():
        time.sleep(0)
        sum(range(20))
        now = time.perf_counter()
        try:
            cpu = time.clock_gettime(clock)
        except OSError:  # the thread has just ended
            cpu = last_cpu
        longest, hold = max(longest, now - last), max(hold, cpu - last_cpu)
        last, last_cpu = now, cpu
    thread.join()
    return longest, hold, took[0]


def stalls(collector: metrics.NateditCollector, registry: object, rounds: int
           ) -> dict[str, tuple[float, float, float, float]]:
    """Per scrape, over ``rounds`` rounds (the variants alternate within each round, so
    the machine's noise falls on all alike): the longest packet-loop gap and the
    longest hold (worst of the rounds, and the median of each round's longest hold),
    and the scrape time (median). Before (Python's 5 ms switch interval): /calls as
    one json.dumps (before issue 11 item 6), in 256-call pieces without letting go
    (6dbecb9), /metrics; now: /calls and /metrics as the worker serves them
    (metrics.SWITCH_INTERVAL, let_go between pieces)."""
    def one_shot() -> bytes:
        return json.dumps({"calls": collector.calls_json()}).encode()

    def pieces_256() -> int:  # 6dbecb9's /calls: 256 calls a piece, each freed, no let-go
        sent, rows = 0, []
        for chunk in collector.calls_chunks():
            rows += chunk
            if len(rows) >= 256:
                sent += len(json.dumps(rows).encode())  # (sent, then freed, as the server)
                rows = []
        return sent + len(json.dumps(rows).encode())

    def busy() -> None:  # a thread of pure Python letting go every 0.1 ms or so: the floor
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            sum(range(500))
            metrics.let_go()

    def now_calls() -> int:  # as metrics.make_app serves /calls (each piece sent, freed)
        with metrics.no_collection():
            return sum(map(len, metrics.calls_body(collector.calls_chunks())))

    def now_metrics() -> bytes:  # as metrics.make_app serves /metrics
        with metrics.no_collection():
            return generate_latest(registry)  # type: ignore[arg-type]

    def ids(body: bytes) -> list[int]:
        return [c["public_call_id"] for c in json.loads(body)["calls"]]

    joined = b"".join(metrics.calls_body(collector.calls_chunks()))
    assert ids(one_shot()) == ids(joined)  # the same calls (times move on)
    default, let_go = sys.getswitchinterval(), metrics.let_go
    variants: list[tuple[str, Callable[[], object], bool]] = [
        ("no_scrape", lambda: time.sleep(0.3), False),  # the machine's own noise
        ("calls_one_shot", one_shot, False), ("calls_256", pieces_256, False),
        ("metrics_before", lambda: generate_latest(registry), False),  # type: ignore[arg-type]
        ("no_scrape_now", lambda: time.sleep(0.3), True),
        ("busy_thread_now", busy, True),
        ("calls_now", now_calls, True),
        ("metrics_now", now_metrics, True),
    ]
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in variants}
    try:
        for _ in range(rounds):
            for name, fn, now in variants:
                sys.setswitchinterval(metrics.SWITCH_INTERVAL if now else default)
                metrics.let_go = let_go if now else (lambda: None)
                runs[name].append(longest_stall(fn))
    finally:
        sys.setswitchinterval(default)
        metrics.let_go = let_go
    return {name: (max(r[0] for r in rs), max(r[1] for r in rs),
                   statistics.median(r[1] for r in rs), statistics.median(r[2] for r in rs))
            for name, rs in runs.items()}


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
    print(f"{'scrape':<16}{'longest gap ms':>15}{'longest hold ms':>16}{'median hold':>12}"
          f"{'scrape ms':>10}")
    for name, (longest, hold, median_hold, took) in stall.items():
        print(f"{name:<16}{longest * 1e3:>15.1f}{hold * 1e3:>16.1f}{median_hold * 1e3:>12.1f}"
              f"{took * 1e3:>10.1f}")
    verdict = "met" if max(rows["http"][0], rows["http_gzip"][0]) < 1.0 else "MISSED"
    print(f"target: a scrape with 10,000 live calls well under 1 s: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "series": series, "bytes": len(text),
                       "seconds": {k: {"median": m, "best": b} for k, (m, b) in rows.items()},
                       "stall_seconds": {k: {"longest": x, "hold": h, "median_hold": m,
                                             "scrape": t}
                                         for k, (x, h, m, t) in stall.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
