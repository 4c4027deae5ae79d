"""Scrape time with many live calls: what one Prometheus scrape of the worker costs.

    .venv/bin/python -m bench.metrics [--calls N] [--rounds R] [--json FILE]

The calls are built through the core (Outgoing-Call-Request and Reply over a TCP
connection each, as bench/core.py does), so the table is the one a worker holds.
Three figures, each the median and the best of R rounds:

* ``collect``: the collector alone (every family, one series per call);
* ``exposition``: collect plus the Prometheus text format (``generate_latest``);
* ``http``: a GET of /metrics through the worker's own HTTP server on loopback
  (process metrics included); ``http_gzip``: the same with the headers Prometheus
  sends (OpenMetrics, gzip).

Target from the metrics issue: a scrape with 10,000 live calls well under a second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address

from prometheus_client import generate_latest

from bench.core import IN, OUT, SERVER, setup_packets, translator
from natedit import Allocation, metrics
from natedit._translator import Translator
from natedit.status import PolicyStatus


def live_calls(n: int) -> Translator:
    """A translator holding ``n`` established calls, one per control connection, built
    from packets as bench/core.py's ``established`` does (without its check that every
    request is rewritten: a sequential public ID may equal the client's own)."""
    tr = translator(Allocation.SEQUENTIAL)
    opens, requests, replies = setup_packets(n, 1)
    server = IPv4Address(SERVER).packed
    for p in opens:
        tr.handle_packet(p, IN if p[12:16] == server else OUT, 0)
    for q, r in zip(requests, replies, strict=True):
        tr.handle_packet(q, OUT, 0)
        tr.handle_packet(r, IN, 0)
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
    print(f"{args.calls:,} live calls, {series:,} natedit_call_info series, "
          f"{len(text) / 1e6:.2f} MB per scrape")
    print(f"{'figure':<12}{'median ms':>12}{'best ms':>10}")
    for name, (median, best) in rows.items():
        print(f"{name:<12}{median * 1e3:>12.1f}{best * 1e3:>10.1f}")
    verdict = "met" if max(rows["http"][0], rows["http_gzip"][0]) < 1.0 else "MISSED"
    print(f"target: a scrape with 10,000 live calls well under 1 s: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "series": series, "bytes": len(text),
                       "seconds": {k: {"median": m, "best": b} for k, (m, b) in rows.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
