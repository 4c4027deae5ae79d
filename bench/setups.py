"""Call set-ups per second through a gateway: natedit ``datapath: userspace`` and ``kernel``
side by side.

    sudo .venv/bin/python -m bench.setups [--repeat N] [--connections N] [--calls M] [--json PATH]
    sudo scripts/dev setups [same options]

In bench.datapath's namespaces (sender, gateway, receiver; a per-run prefix, all
removed at exit), a PPTP client in ``in`` opens ``--connections`` control
connections through the gateway to a server in ``out``, one after the other, each
a Start-Control-Connection and then ``--calls`` Outgoing-Call-Requests sent at once,
each answered by an Outgoing-Call-Reply naming the public Call ID natedit wrote. A
call is set up when its reply, rewritten by natedit, reaches the client with the
client's own Call ID; every connection and call stays up to the end. The figure is
calls per second from the first connection to the last reply, measured in the
client, so it includes the TCP handshake and the Start-Control-Connection of each
connection. With ``datapath: kernel`` every established call is also put into the
tc-BPF program's maps (one batch per turn of the worker's loop), which is what this
compares. (``--connections 1 --calls 20000`` measures many calls on one connection:
the core finds a connection's call by Call ID in its per-connection index, O(1); the
walk it replaced made it quadratic, 831/s against 3,757/s now, userspace.)

The two datapaths are interleaved, in a rotated order, ``--repeat`` times (a fresh
gateway and worker each time); the ratio kernel / userspace is taken within each
repetition and the table shows medians. Issue 13's target: kernel within 20 % of
userspace (ratio >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.datapath import SERVER, Topology, prerequisites, read_line, say, start_natedit
from natedit.core.wire import MessageType, build_control_message

PATHS = ("natedit-userspace", "natedit-kernel")
GOAL = 0.8
"""kernel / userspace call set-ups per second at least (issue 13: within 20 %)."""
MT = MessageType
REQUEST_LEN, REPLY_LEN = 168, 32


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def peer_pac(connections: int, calls: int) -> None:
    """The server: ``connections`` control connections one after the other, a reply to
    each of ``calls`` requests on each (its own Call IDs 1, 2, ... across all), every
    connection held open until the client closes it."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((SERVER, 1723))
    srv.listen(64)
    print("listening", flush=True)
    held = []
    answered = 0
    for _ in range(connections):
        conn, _ = srv.accept()
        held.append(conn)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _recv_exact(conn, 156)
        conn.sendall(build_control_message(MT.START_CONTROL_CONNECTION_REPLY))
        pending = bytearray()
        mine = 0
        while mine < calls:
            chunk = conn.recv(65536)
            if not chunk:
                raise SystemExit(f"server: connection closed after {answered} calls")
            pending += chunk
            replies = []
            while len(pending) >= REQUEST_LEN:
                public = struct.unpack_from("!H", pending, 12)[0]
                del pending[:REQUEST_LEN]
                answered += 1
                mine += 1
                replies.append(build_control_message(MT.OUTGOING_CALL_REPLY,
                                                     call_id=answered, peer_call_id=public))
            if replies:
                conn.sendall(b"".join(replies))
    print(json.dumps({"answered": answered}), flush=True)
    for conn in held:
        while conn.recv(4096):
            pass


def peer_pns(connections: int, calls: int) -> None:
    """The client: ``connections`` control connections one after the other, each a
    Start-Control-Connection and then ``calls`` Outgoing-Call-Requests at once (Call
    IDs 1..calls), kept open (the calls stay up); prints the calls per second."""
    requests = b"".join(build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=i)
                        for i in range(1, calls + 1))
    hello = build_control_message(MT.START_CONTROL_CONNECTION_REQUEST)
    held = []
    t0 = time.perf_counter()
    for _ in range(connections):
        conn = socket.create_connection((SERVER, 1723), timeout=30)
        held.append(conn)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(hello)
        _recv_exact(conn, 156)
        conn.sendall(requests)
        replies = _recv_exact(conn, REPLY_LEN * calls)
        for i in range(calls):  # the client's own Call IDs, in order
            peer = struct.unpack_from("!H", replies, i * REPLY_LEN + 14)[0]
            if peer != i + 1:
                raise SystemExit(f"reply {i + 1} names Call ID {peer}, not the client's")
    seconds = time.perf_counter() - t0
    total = connections * calls
    print(json.dumps({"calls": total, "seconds": seconds, "per_s": total / seconds}),
          flush=True)
    for conn in held:
        conn.close()


def measure(path: str, prefix: str, tmp: Path, connections: int,
            calls: int) -> dict[str, Any]:
    """One gateway with ``path``'s worker; the client's figure."""
    total = connections * calls
    with Topology(prefix, tmp) as topo:
        limits = (f"limits:\n  max_calls_per_client: {total}\n  max_calls: 65535\n"
                  f"  max_control_connections: {max(connections, 16)}\n"
                  f"  new_calls_per_second: 0\n")
        info = start_natedit(topo, path, limits)
        want = path.removeprefix("natedit-")
        if info.get("datapath") != want:
            raise RuntimeError(f"the worker runs datapath {info.get('datapath')}, not {want}")
        pac = topo.popen(topo.ns_out, [sys.executable, "-m", "bench.setups", "_pac",
                                       str(connections), str(calls)], stdout=subprocess.PIPE)
        _line(pac, "listening", 10)
        pns = topo.popen(topo.ns_in, [sys.executable, "-m", "bench.setups", "_pns",
                                      str(connections), str(calls)], stdout=subprocess.PIPE)
        figure = json.loads(_line(pns, "{", 120))
        _line(pac, "{", 10)
        topo.stop(pns, signal.SIGTERM)
        return {"per_s": figure["per_s"], "seconds": figure["seconds"], "calls": total}


_PENDING: dict[int, bytearray] = {}


def _line(proc: subprocess.Popen[bytes], start: str, timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = read_line(fd, start, timeout, _PENDING.setdefault(fd, bytearray()))
    if line is None:
        err = proc.stderr.read1().decode(errors="replace") if proc.stderr else ""  # type: ignore[attr-defined]
        raise RuntimeError(f"no line {start!r} from {proc.args!r}: {err[-1500:]}")
    return line


def summarize(reps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    ratios = [r["natedit-kernel"]["per_s"] / r["natedit-userspace"]["per_s"] for r in reps]
    return {path: statistics.median(r[path]["per_s"] for r in reps) for path in PATHS} | {
        "kernel_vs_userspace": statistics.median(ratios), "ratios": ratios}


def table(summary: dict[str, Any]) -> str:
    ratio = summary["kernel_vs_userspace"]
    lines = ["call set-ups per second (request + reply through the gateway), medians:", "",
             "| datapath | call set-ups/s | x userspace |", "|---|---|---|"]
    for path in PATHS:
        lines.append(f"| {path.removeprefix('natedit-')} | {summary[path]:,.0f} | "
                     f"{summary[path] / summary['natedit-userspace']:.2f} |")
    per_run = ", ".join(f"{r:.2f}" for r in summary["ratios"])
    verdict = "met" if ratio >= GOAL else f"MISSED ({ratio / GOAL - 1:+.0%})"
    lines.append(f"\ntarget: kernel call set-ups within 20 % of userspace: kernel / userspace "
                 f"{ratio:.2f} (runs: {per_run}): {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] in ("_pac", "_pns"):
        (peer_pac if args_in[0] == "_pac" else peer_pns)(int(args_in[1]), int(args_in[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds over both datapaths")
    ap.add_argument("--connections", type=int, default=500,
                    help="control connections per round, one after the other (default 500)")
    ap.add_argument("--calls", type=int, default=4,
                    help="calls set up on each connection, asked at once (default 4)")
    ap.add_argument("--json", metavar="PATH", help="write every figure here")
    args = ap.parse_args(args_in)
    if not (args.connections >= 1 and args.calls >= 1
            and args.connections * args.calls <= 65535):
        ap.error("--connections x --calls: 1 to 65535 (the server's Call IDs)")
    problems = prerequisites()
    if problems:
        for p in problems:
            say(f"bench.setups: {p}")
        return 1
    prefix = f"nbsu{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
    reps: list[dict[str, dict[str, Any]]] = []
    started = time.monotonic()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as tmpdir:
        try:
            for rep in range(args.repeat):
                order = PATHS[rep % 2:] + PATHS[:rep % 2]
                figures: dict[str, dict[str, Any]] = {}
                for path in order:
                    say(f"[setups] run {rep + 1}/{args.repeat} {path} ...", end="")
                    figures[path] = measure(path, prefix, Path(tmpdir), args.connections,
                                            args.calls)
                    say(f" {figures[path]['per_s']:,.0f} set-ups/s")
                reps.append(figures)
        except KeyboardInterrupt:
            say("\n[setups] interrupted; namespaces removed")
            return 130
    summary = summarize(reps)
    text = table(summary)
    print(text)
    print(f"\n{args.repeat} runs, {args.connections} connections x {args.calls} calls each, "
          f"{time.monotonic() - started:.0f} s in all; {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"command": "python -m bench.setups " + " ".join(args_in), "runs": reps,
             "summary": summary, "table": text, "met": summary["kernel_vs_userspace"] >= GOAL},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
