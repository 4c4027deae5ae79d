"""The public Call ID pool in blocks of 256: what one connection gets (issue 11, item 7).

    .venv/bin/python -m bench.pool [--fractions 0.1,0.25,0.5,0.75,0.9] [--calls 4096]

Other clients' calls (one control connection each, a random client Call ID, the
default random allocation) fill the default pool (1..65535, one server) to a
fraction; then one connection asks for calls with client Call IDs 1, 2, 3, ...
(all sharing high byte 0 for the first 255, as pptp-linux counts them), up to
``--calls``. For each fraction: the calls it got while the high-byte rule held
(before the allocator first relaxed it), the calls it got in all (before a
refusal, if any), the free IDs left then, and the time per call. Only the call
table is used (``CallTable.refusal`` / ``allocate``), so the same file measures an
older tree: ``PYTHONPATH=<tree> python bench/pool.py``.
"""

from __future__ import annotations

import argparse
import random
import time
from ipaddress import IPv4Address

from natedit import Policy
from natedit.core.table import CallTable

PUBLIC = IPv4Address("198.51.100.1")
SERVER = IPv4Address("198.51.100.2").packed


def run(fraction: float, seed: int, calls: int) -> dict[str, float]:
    t = CallTable(Policy(public_address=PUBLIC, max_calls_per_client=65535, max_calls=65535,
                         max_control_connections=1_000_000), random.Random(seed))
    rng = random.Random(seed + 1)
    others = int(65535 * fraction)
    for i in range(others):
        client = bytes([10, 1 + (i >> 16), (i >> 8) & 0xFF, i & 0xFF])
        conn = t.connection((client, 40000, SERVER, 1723), 0.0, create=True)
        assert conn is not None and t.allocate(conn, rng.randrange(256), PUBLIC.packed, 0.0)
    conn = t.connection((bytes([10, 0, 0, 5]), 40000, SERVER, 1723), 0.0, create=True)
    assert conn is not None
    within = None
    got = 0
    started = time.perf_counter()
    for cid in range(1, calls + 1):
        if t.refusal(conn, PUBLIC.packed, [cid >> 8]) is not None:
            break
        relaxed = t.relaxed
        call = t.allocate(conn, cid >> 8, PUBLIC.packed, 0.0)
        assert call is not None
        conn.set_ids(call, client_call_id=cid)
        if within is None and t.relaxed > relaxed:
            within = got
        got += 1
    elapsed = time.perf_counter() - started
    return {"fraction": fraction, "others": others, "within_rule": got if within is None
            else within, "got": got, "free_at_refusal": 65535 - len(t),
            "us_per_call": elapsed / max(got, 1) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.1,0.25,0.5,0.75,0.9")
    ap.add_argument("--calls", type=int, default=4096, help="the connection's calls at most")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    print(f"{'pool used':>9} {'others':>7} {'within rule':>11} {'got':>6} "
          f"{'free then':>9} {'us/call':>8}")
    for f in (float(x) for x in args.fractions.split(",")):
        r = run(f, args.seed, args.calls)
        print(f"{r['fraction']:>9.0%} {r['others']:>7} {r['within_rule']:>11} {r['got']:>6} "
              f"{r['free_at_refusal']:>9} {r['us_per_call']:>8.1f}")


if __name__ == "__main__":
    main()
