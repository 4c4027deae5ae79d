"""Datapath benchmark: what a gateway passes, and the delay it adds, path by path.

    sudo .venv/bin/python -m bench.datapath [--repeat N] [--seconds S] [--json PATH]
    sudo scripts/dev datapath [same options]

In network namespaces of its own (a per-run prefix; everything is removed at
exit, Ctrl-C included), one sender, one gateway, one receiver::

    <p>-in  eth0 10.0.0.11 --- in0 [<p>-gw] out0 198.51.100.1 --- eth0 198.51.100.2  <p>-out

it floods enhanced GRE through the gateway with trafgen (netsniff-ng; frames
built once, one sender process on CPU 0) and counts, in an nftables ingress
hook of the receiver, the frames that arrive *correctly translated* (right
address, right Call ID), for each gateway:

* ``plain``: forwarding, no rules (the ceiling);
* ``kernel-helper``: MASQUERADE plus the kernel's ``nf_nat_pptp``
  (``-t raw ... -j CT --helper pptp``);
* ``nfq-accept``: a bare NetfilterQueue worker that only accepts (GRE
  untranslated), the reference for what any Python queue worker can do;
* ``natedit-userspace``: ``natedit run`` with ``datapath: userspace``;
* ``natedit-kernel``: ``natedit run`` with ``datapath: kernel``;
* ``natedit-userspace-before``, ``natedit-kernel-before`` (with ``--before
  DIR``): the same, running the natedit of another source tree (a ``git
  worktree`` of an earlier commit), for a before/after in one run: the table
  then has the ratio of each ``natedit-*`` path to its ``-before``.

Queue workers run on CPU 1 (``taskset``); the flood sender and the latency
probes' sender and receiver on CPU 0, so that every probe crosses to the
worker's CPU as the flood does (left to the scheduler, a probe sent from the
worker's own CPU skipped the cross-CPU wake-up, and a path's median latency
moved 2x between runs). A PPTP control conversation through
the gateway (Start-Control-Connection, Outgoing-Call-Request/Reply, from
sockets in the two outer namespaces) sets up the call first, so the
helper and natedit both know it. Each path is measured for small (64 B
payload) and large (1400 B) GRE in both directions, then its latency: GRE
probes (timestamp in the payload, received on a raw socket with kernel
receive timestamps) at a low rate, one way; "added" is the path's figure
minus plain forwarding's in the same repetition. Paths are interleaved, in
a rotated order, ``--repeat`` times; ratios are taken within each repetition,
and the table shows medians. Progress goes to stderr, the table to stdout,
every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from natedit.core.wire import MessageType, build_control_message, build_gre
from natedit.lab import netns
from natedit.lab.procs import Processes

REPO = Path(__file__).resolve().parent.parent
INSIDE, GW_INSIDE, PUBLIC, SERVER = "10.0.0.11", "10.0.0.1", "198.51.100.1", "198.51.100.2"
CLIENT_CALL_ID, SERVER_CALL_ID = 0x1234, 0x0100
FLOOD_MARK = 0xFF03
"""First two payload bytes of flood frames (PPP address and control); probes differ."""
PROBE_MARK = b"NE"
SIZES = (64, 1400)
DIRECTIONS = ("out", "in")
PATHS = ("plain", "kernel-helper", "nfq-accept", "natedit-userspace", "natedit-kernel")
SENDER_CPU, WORKER_CPU = "0", "1"
WARMUP = 0.5
MT = MessageType

NFQ_ACCEPT = """
import selectors, sys
from netfilterqueue import COPY_PACKET, NetfilterQueue
queues = []
for number in (1723, 1724):
    q = NetfilterQueue()
    q.bind(number, lambda p: p.accept(), 4096, COPY_PACKET, 0xFFFF, 4096 * 2400)
    queues.append(q)
sel = selectors.DefaultSelector()
for q in queues:
    sel.register(q.get_fd(), selectors.EVENT_READ, q)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        key.data.run(block=False)
"""


def say(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


# -- the topology ------------------------------------------------------------------------------


NET = netns.Topology(
    nodes=("in", "gw", "out"),
    links=(netns.Veth(netns.Port("gw", "in0", f"{GW_INSIDE}/24"),
                      netns.Port("in", "eth0", f"{INSIDE}/24")),
           netns.Veth(netns.Port("gw", "out0", f"{PUBLIC}/24"),
                      netns.Port("out", "eth0", f"{SERVER}/24"))),
    routes=(netns.Route("in", "default", GW_INSIDE), netns.Route("out", "10.0.0.0/24", PUBLIC),
            netns.Route("gw", "default", SERVER)),
    forwarding=("gw",),
)
"""Three namespaces, two veth pairs (natedit.lab.netns builds and removes them)."""


@dataclass
class Topology(netns.Scoped):
    """The bench's namespaces; processes started here are stopped by PID."""

    prefix: str
    tmp: Path
    net: netns.Netns = field(init=False)
    procs: Processes = field(init=False)

    def __post_init__(self) -> None:
        self.net = netns.Netns(NET, self.prefix)
        self.procs = Processes(self.tmp)

    @property
    def ns_in(self) -> str:
        return self.net.name("in")

    @property
    def ns_gw(self) -> str:
        return self.net.name("gw")

    @property
    def ns_out(self) -> str:
        return self.net.name("out")

    def ns(self, ns: str, *argv: str, check: bool = True, input: str | None = None) -> str:
        return self.net.exec(ns, argv, check=check, input=input, timeout=30).stdout

    def build(self) -> None:
        self.net.build()
        for ns in (self.ns_in, self.ns_out):
            self.ns(ns, "nft", "-f", "-", input=RECEIVER_TABLE)
        # neighbours resolved once, so the first frames are not lost to ARP
        self.ns(self.ns_in, "ping", "-c1", "-W1", GW_INSIDE, check=False)
        self.ns(self.ns_out, "ping", "-c1", "-W1", PUBLIC, check=False)

    def mac(self, ns: str, dev: str) -> str:
        return str(json.loads(run(["ip", "-n", ns, "-j", "link", "show", dev]))[0]["address"])

    def popen(self, ns: str, argv: Sequence[str], *, cpu: str | None = None,
              stdout: int | None = subprocess.DEVNULL,
              cwd: Path = REPO) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``ns``; stopped through its own process group (trafgen's
        worker is a child of the process we started), SIGKILL after 5 s."""
        pin = ["taskset", "-c", cpu] if cpu is not None else []
        return self.procs.popen(self.net.argv(ns, [*pin, *argv]), stdout=stdout,
                                stderr=subprocess.PIPE, cwd=str(cwd), grace=5.0, group=True)

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        self.procs.stop(proc, sig)

    def teardown(self) -> None:
        netns.raise_errors(self.procs.stop_all() + self.net.remove())


RECEIVER_TABLE = """table netdev bench {
\tcounter flood {}
\tcounter good {}
\tchain rx {
\t\ttype filter hook ingress device eth0 priority 0; policy accept;
\t}
}
"""


def count_rules(good: str) -> str:
    """Ingress rules of the receiver: every flood frame is counted, and dropped (no
    ICMP back); ``good`` selects the correctly translated ones."""
    mark = f"ip protocol gre @th,96,16 {FLOOD_MARK:#06x}"
    return (f"flush chain netdev bench rx\n"
            f"add rule netdev bench rx {mark} counter name flood\n"
            f"add rule netdev bench rx {mark} {good} counter name good\n"
            f"add rule netdev bench rx {mark} drop\n")


# -- what each path needs --------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """Addresses and Call IDs of the flood in one direction, and of its good arrivals."""

    src: str
    dst: str
    call_id: int
    good: str


def flows(path: str, public_call_id: int | None) -> dict[str, Flow]:
    if path in ("plain", "nfq-accept"):
        return {"out": Flow(INSIDE, SERVER, SERVER_CALL_ID,
                            f"ip saddr {INSIDE} @th,48,16 {SERVER_CALL_ID}"),
                "in": Flow(SERVER, INSIDE, CLIENT_CALL_ID,
                           f"ip daddr {INSIDE} @th,48,16 {CLIENT_CALL_ID}")}
    assert public_call_id is not None
    return {"out": Flow(INSIDE, SERVER, SERVER_CALL_ID,
                        f"ip saddr {PUBLIC} @th,48,16 {SERVER_CALL_ID}"),
            "in": Flow(SERVER, PUBLIC, public_call_id,
                       f"ip daddr {INSIDE} @th,48,16 {CLIENT_CALL_ID}")}


BEFORE = "-before"
"""The suffix of a path that runs the natedit of ``--before DIR``."""


def setup_path(topo: Topology, path: str, before: Path | None = None) -> int | None:
    """Rules and processes of ``path`` in the gateway; the call's public Call ID.
    ``before``: the source tree a ``*-before`` path runs natedit from."""
    gw = topo.ns_gw
    if path == "plain":
        return None
    if path == "nfq-accept":
        for rule in (["-t", "raw", "-A", "PREROUTING", "-p", "gre", "-j", "CT", "--notrack"],
                     ["-t", "mangle", "-A", "PREROUTING", "-p", "gre", "-d", "10.0.0.0/24",
                      "-j", "NFQUEUE", "--queue-num", "1724"],
                     ["-t", "mangle", "-A", "FORWARD", "-p", "gre", "-s", "10.0.0.0/24",
                      "-j", "NFQUEUE", "--queue-num", "1723"]):
            topo.ns(gw, "iptables", "-w", *rule)
        proc = topo.popen(gw, [sys.executable, "-c", NFQ_ACCEPT], cpu=WORKER_CPU,
                          stdout=subprocess.PIPE)
        _wait_line(proc, "ready", 10)
        return None
    topo.ns(gw, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "out0", "-j",
            "MASQUERADE")
    if path == "kernel-helper":
        topo.ns(gw, "iptables", "-w", "-t", "raw", "-A", "PREROUTING", "-p", "tcp",
                "--dport", "1723", "-j", "CT", "--helper", "pptp")
    else:
        start_natedit(topo, path, before=before)
    pac = topo.popen(topo.ns_out, [sys.executable, "-m", "bench.datapath", "_pac"],
                     stdout=subprocess.PIPE)
    _wait_line(pac, "listening", 10)
    pns = topo.popen(topo.ns_in, [sys.executable, "-m", "bench.datapath", "_pns"],
                     stdout=subprocess.PIPE)
    line = _wait_line(pac, "{", 10)
    _wait_line(pns, "connected", 10)
    return int(json.loads(line)["public_call_id"])


def start_natedit(topo: Topology, path: str, policy_extra: str = "",
                  before: Path | None = None) -> dict[str, Any]:
    """``natedit run`` in the gateway for ``path`` (natedit-userspace, natedit-kernel, or
    either ``-before``: from the source tree ``before``) on the worker CPU, once it is
    ready; what its ready file says. ``policy_extra``: more YAML for its policy."""
    datapath = path.removeprefix("natedit-").removesuffix(BEFORE)
    source = REPO
    if path.endswith(BEFORE):
        if before is None:
            raise RuntimeError(f"{path} needs --before DIR")
        source = before  # python -m natedit finds the package of its cwd first
    policy = topo.tmp / f"{path}.yaml"
    policy.write_text(f"public_address: {PUBLIC}\ninside_networks: [10.0.0.0/24]\n"
                      f"datapath: {datapath}\n{policy_extra}logging:\n  level: warning\n")
    ready = topo.tmp / f"{path}.ready"
    ready.unlink(missing_ok=True)
    proc = topo.popen(topo.ns_gw, [sys.executable, "-m", "natedit", "run", "--policy",
                                   str(policy), "--ready-file", str(ready), "--pid-file", "",
                                   "--state", ""], cpu=WORKER_CPU, cwd=source)
    deadline = time.monotonic() + 15
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"natedit did not start: {err[-2000:]}")
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


def _wait_line(proc: subprocess.Popen[bytes], start: str, timeout: float) -> str:
    """The next whole line of ``proc``'s stdout that starts with ``start``."""
    assert proc.stdout is not None
    pending = _PENDING.setdefault(proc.stdout, bytearray())
    line = read_line(proc.stdout.fileno(), start, timeout, pending)
    if line is not None:
        return line
    err = proc.stderr.read1().decode(errors="replace") if proc.stderr else ""  # type: ignore[attr-defined]
    raise RuntimeError(f"no line {start!r} from {proc.args!r}: {bytes(pending)!r} {err[-1500:]}")


_PENDING: weakref.WeakKeyDictionary[IO[bytes], bytearray] = weakref.WeakKeyDictionary()
"""Per pipe, what was read past the last line returned (the next call starts there)."""


def read_line(fd: int, start: str, timeout: float, pending: bytearray) -> str | None:
    """The next line from ``fd`` that starts with ``start``, once its newline has arrived.

    ``pending`` holds the bytes read but not yet consumed, across calls: a line may
    arrive in many reads, and one read may hold the ends of several lines. Lines
    that do not start with ``start`` are consumed and skipped. A last line cut off by
    end of file counts as whole. None when nothing matched within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    eof = False
    while True:
        while (end := pending.find(b"\n")) >= 0 or (eof and pending):
            end = end if end >= 0 else len(pending)
            line = pending[:end].decode(errors="replace")
            del pending[:end + 1]
            if line.startswith(start):
                return line
        remaining = deadline - time.monotonic()
        if eof or remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(0.1, remaining))
        if ready:
            chunk = os.read(fd, 65536)
            eof = not chunk
            pending += chunk


# -- throughput --------------------------------------------------------------------------------


def trafgen_config(frame: bytes) -> str:
    return "{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n"


def ether(dst_mac: str, src_mac: str, packet: bytes) -> bytes:
    return bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(
        src_mac.replace(":", "")) + b"\x08\x00" + packet


def read_counter(topo: Topology, ns: str, name: str) -> int:
    text = topo.ns(ns, "nft", "list", "counter", "netdev", "bench", name)
    m = re.search(r"packets (\d+)", text)
    return int(m.group(1)) if m else 0


def tx_packets(topo: Topology, ns: str) -> int:
    return int(topo.ns(ns, "cat", "/sys/class/net/eth0/statistics/tx_packets"))


def throughput(topo: Topology, flow: Flow, direction: str, size: int,
               seconds: float) -> dict[str, float]:
    sender, receiver = ((topo.ns_in, topo.ns_out) if direction == "out"
                        else (topo.ns_out, topo.ns_in))
    gw_dev = "in0" if direction == "out" else "out0"
    payload = struct.pack("!H", FLOOD_MARK) + bytes(size - 2)
    frame = ether(topo.mac(topo.ns_gw, gw_dev), topo.mac(sender, "eth0"),
                  build_gre(flow.src, flow.dst, flow.call_id, payload, seq=1))
    cfg = topo.tmp / f"flood-{direction}-{size}.cfg"
    cfg.write_text(trafgen_config(frame))
    topo.ns(receiver, "nft", "-f", "-", input=count_rules(flow.good))
    gen = topo.popen(sender, ["trafgen", "-o", "eth0", "-i", str(cfg), "-P", "1",
                              "--no-sock-mem", "-Q", "-C"], cpu=SENDER_CPU)
    try:
        time.sleep(WARMUP)
        t0, good0, all0, tx0 = (time.monotonic(), read_counter(topo, receiver, "good"),
                                read_counter(topo, receiver, "flood"), tx_packets(topo, sender))
        time.sleep(seconds)
        t1, good1, all1, tx1 = (time.monotonic(), read_counter(topo, receiver, "good"),
                                read_counter(topo, receiver, "flood"), tx_packets(topo, sender))
        alive = gen.poll() is None
    finally:
        err = b""
        if gen.poll() is not None and gen.stderr is not None:
            err = gen.stderr.read()
        topo.stop(gen, signal.SIGINT)
    if not alive:
        raise RuntimeError(f"trafgen exited ({gen.returncode}): {err.decode(errors='replace')}")
    dt = t1 - t0
    return {"pps": (good1 - good0) / dt, "arrived_pps": (all1 - all0) / dt,
            "offered_pps": (tx1 - tx0) / dt}


# -- latency -----------------------------------------------------------------------------------


def latency(topo: Topology, flow: Flow, direction: str, probes: int) -> dict[str, float]:
    sender, receiver = ((topo.ns_in, topo.ns_out) if direction == "out"
                        else (topo.ns_out, topo.ns_in))
    rx = topo.popen(receiver, [sys.executable, "-m", "bench.datapath", "_probe_rx",
                               str(probes)], stdout=subprocess.PIPE, cpu=SENDER_CPU)
    _wait_line(rx, "listening", 10)
    tx = topo.popen(sender, [sys.executable, "-m", "bench.datapath", "_probe_tx", flow.src,
                             flow.dst, str(flow.call_id), str(probes)], cpu=SENDER_CPU)
    line = _wait_line(rx, "{", 10 + probes * 0.01)
    tx.wait(10)
    samples = json.loads(line)["us"]
    if len(samples) < probes * 0.9:
        raise RuntimeError(f"latency: {len(samples)} of {probes} probes came back")
    samples.sort()
    return {"median_us": statistics.median(samples),
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            "received": len(samples)}


# -- the peers (run as ``python -m bench.datapath _<role>`` inside a namespace) ---------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def peer_pac() -> None:
    """The server end of the control conversation: answers one call, then holds on."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((SERVER, 1723))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _recv_exact(conn, 156)
    conn.sendall(build_control_message(MT.START_CONTROL_CONNECTION_REPLY))
    ocrq = _recv_exact(conn, 168)
    public = struct.unpack_from("!H", ocrq, 12)[0]
    conn.sendall(build_control_message(MT.OUTGOING_CALL_REPLY, call_id=SERVER_CALL_ID,
                                       peer_call_id=public))
    print(json.dumps({"public_call_id": public}), flush=True)
    while conn.recv(4096):
        pass


def peer_pns() -> None:
    """The client end: Start-Control-Connection, one Outgoing-Call-Request, then holds on."""
    conn = socket.create_connection((SERVER, 1723), timeout=10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(build_control_message(MT.START_CONTROL_CONNECTION_REQUEST))
    _recv_exact(conn, 156)
    conn.sendall(build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=CLIENT_CALL_ID))
    ocrp = _recv_exact(conn, 32)
    peer = struct.unpack_from("!H", ocrp, 14)[0]
    if peer != CLIENT_CALL_ID:
        raise SystemExit(f"Outgoing-Call-Reply names Call ID {peer:#x}, not ours")
    print("connected", flush=True)
    conn.settimeout(None)
    while conn.recv(4096):
        pass


SO_TIMESTAMPNS = 35


def peer_probe_rx(count: int) -> None:
    """Receive probes on a raw GRE socket with kernel receive timestamps; print the
    one-way delays (us)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.settimeout(3.0)
    print("listening", flush=True)
    delays: list[float] = []
    with contextlib.suppress(TimeoutError):
        while len(delays) < count:
            data, ancillary, _, _ = sock.recvmsg(2048, 64)
            ihl = (data[0] & 0x0F) * 4
            body = data[ihl + 12:]
            if not body.startswith(PROBE_MARK):
                continue
            sent = struct.unpack_from("!Q", body, 6)[0]
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    delays.append((sec * 1_000_000_000 + nsec - sent) / 1000)
    print(json.dumps({"us": delays}), flush=True)


def peer_probe_tx(src: str, dst: str, call_id: int, count: int) -> None:
    """Send ``count`` probes, one per millisecond, each with its send time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    time.sleep(0.05)
    for seq in range(count):
        payload = PROBE_MARK + struct.pack("!IQ", seq, time.time_ns()) + bytes(42)
        sock.sendto(build_gre(src, dst, call_id, payload, seq=seq), (dst, 0))
        time.sleep(0.001)


# -- the run -----------------------------------------------------------------------------------


def measure_path(path: str, prefix: str, tmp: Path, seconds: float,
                 probes: int, before: Path | None = None) -> dict[str, Any]:
    with Topology(prefix, tmp) as topo:
        public_call_id = setup_path(topo, path, before)
        fl = flows(path.removesuffix(BEFORE), public_call_id)
        figures: dict[str, Any] = {}
        for size in SIZES:
            for direction in DIRECTIONS:
                figures[f"{direction}_{size}"] = throughput(topo, fl[direction], direction,
                                                            size, seconds)
        for direction in DIRECTIONS:
            figures[f"latency_{direction}"] = latency(topo, fl[direction], direction, probes)
        return figures


def summarize(reps: list[dict[str, dict[str, Any]]], paths: Sequence[str]) -> dict[str, Any]:
    """Per path: median pps, median of the per-repetition ratios, added latency."""
    out: dict[str, Any] = {}
    for path in paths:
        row: dict[str, Any] = {}
        for size in SIZES:
            for d in DIRECTIONS:
                k = f"{d}_{size}"
                pps = [r[path][k]["pps"] for r in reps]
                row[f"{k}_pps"] = statistics.median(pps)
                for ref in ("plain", "kernel-helper", "nfq-accept"):
                    if ref in paths:
                        ratios = [r[path][k]["pps"] / r[ref][k]["pps"] for r in reps
                                  if r[ref][k]["pps"] > 0]
                        row[f"{k}_vs_{ref}"] = statistics.median(ratios) if ratios else 0.0
                then = path + BEFORE
                if then in paths:
                    ratios = [r[path][k]["pps"] / r[then][k]["pps"] for r in reps
                              if r[then][k]["pps"] > 0]
                    row[f"{k}_vs_before"] = statistics.median(ratios) if ratios else 0.0
        for d in DIRECTIONS:
            for stat in ("median_us", "p99_us"):
                values = [r[path][f"latency_{d}"][stat] for r in reps]
                row[f"latency_{d}_{stat}"] = statistics.median(values)
                if "plain" in paths:
                    added = [r[path][f"latency_{d}"][stat] - r["plain"][f"latency_{d}"][stat]
                             for r in reps]
                    row[f"latency_{d}_added_{stat}"] = statistics.median(added)
        out[path] = row
    return out


TARGETS = (
    ("natedit-userspace", "nfq-accept", 0.8,
     "user-space path >= 0.8x a bare accept-only NetfilterQueue worker"),
    ("natedit-kernel", "kernel-helper", 1.15, "kernel datapath >= 1.15x the kernel helper"),
    ("natedit-kernel", "plain", 0.90, "kernel datapath >= 0.90x plain forwarding"),
)
LATENCY_TARGETS = (
    ("natedit-userspace", "nfq-accept", 1.5,
     "user-space path's added median latency <= 1.5x the accept-only worker's"),
    ("natedit-kernel", "kernel-helper", 1.0,
     "kernel datapath's added median latency no worse than the kernel helper's"),
)
LATENCY_SLACK_US = 5.0
"""Added latencies within this of each other count as equal (a few us is the noise of
one run here; added latencies near 0 make their ratio meaningless)."""


def targets(summary: dict[str, Any], paths: Sequence[str]) -> list[dict[str, Any]]:
    """Each target of the datapath issue: the per-figure ratios (medians), met or not.
    Latency targets need ``plain`` (added latency is the path's minus plain's)."""
    out: list[dict[str, Any]] = []
    for path, ref, goal, what in TARGETS:
        if path not in paths or ref not in paths:
            continue
        ratios = {f"{d}_{s}": summary[path][f"{d}_{s}_vs_{ref}"] for s in SIZES
                  for d in DIRECTIONS}
        out.append({"target": what, "goal": goal, "ratios": ratios,
                    "met": min(ratios.values()) >= goal})
    for path, ref, goal, what in LATENCY_TARGETS:
        if path not in paths or ref not in paths:
            continue
        if "plain" not in paths:
            out.append({"target": what, "goal": goal, "latency": None, "met": None})
            continue
        added = {d: (summary[path][f"latency_{d}_added_median_us"],
                     summary[ref][f"latency_{d}_added_median_us"]) for d in DIRECTIONS}
        met = all(ours <= max(goal * theirs, theirs + LATENCY_SLACK_US)
                  for ours, theirs in added.values())
        out.append({"target": what, "goal": goal, "latency": added, "met": met})
    return out


def _latency_cell(row: dict[str, Any]) -> str:
    """Added latency (+X us, vs plain) when plain was measured; else the raw one-way
    figure, marked so."""
    if "latency_out_added_median_us" in row:
        return " / ".join(f"{row[f'latency_{d}_added_median_us']:+.0f} "
                          f"({row[f'latency_{d}_added_p99_us']:+.0f}) us" for d in DIRECTIONS)
    return " / ".join(f"{row[f'latency_{d}_median_us']:.0f} "
                      f"({row[f'latency_{d}_p99_us']:.0f}) us raw" for d in DIRECTIONS)


def _target_line(t: dict[str, Any], names: dict[str, str], cols: list[str]) -> str:
    if "ratios" in t:
        figures = ", ".join(f"{names[c]} {t['ratios'][c]:.2f}" for c in cols)
        verdict = "met" if t["met"] else (
            f"MISSED (worst {min(t['ratios'].values()) / t['goal'] - 1:+.0%})")
        return f"target: {t['target']}: {figures}: {verdict}"
    if t["latency"] is None:
        return f"target: {t['target']}: n/a (needs plain in --paths)"
    figures = ", ".join(
        f"{d} {ours:+.0f} vs {theirs:+.0f} us"
        + (f" ({ours / theirs:.2f}x)" if theirs > LATENCY_SLACK_US else "")
        for d, (ours, theirs) in t["latency"].items())
    return f"target: {t['target']}: {figures}: {'met' if t['met'] else 'MISSED'}"


def table(summary: dict[str, Any], paths: Sequence[str]) -> str:
    cols = [f"{d}_{s}" for s in SIZES for d in DIRECTIONS]
    names = {f"{d}_{s}": f"{d} {s} B" for s in SIZES for d in DIRECTIONS}
    refs = [ref for ref in ("plain", "kernel-helper", "nfq-accept") if ref in paths]
    lat = ("added latency out / in: median (p99)" if "plain" in paths
           else "one-way latency out / in: median (p99), raw (no plain to subtract)")
    lines = [f"packets per second (x {' / x '.join(refs)}), medians of the runs:",
             "",
             "| path | " + " | ".join(names[c] for c in cols) + f" | {lat} |",
             "|---|" + "---|" * len(cols) + "---|"]
    for path in paths:
        row = summary[path]
        cells = []
        for c in cols:
            cell = f"{row[f'{c}_pps'] / 1000:,.0f} k"
            ratios = [f"{row[f'{c}_vs_{ref}']:.2f}" for ref in refs]
            cells.append(f"{cell} ({' / '.join(ratios)})")
        lines.append(f"| {path} | " + " | ".join(cells) + f" | {_latency_cell(row)} |")
    for path in paths:
        if f"{cols[0]}_vs_before" in summary[path]:
            figures = ", ".join(f"{names[c]} {summary[path][f'{c}_vs_before']:.2f}"
                                for c in cols)
            lines.append(f"\n{path} / {path}{BEFORE} (medians of the per-run ratios): {figures}")
    for t in targets(summary, paths):
        lines.append("\n" + _target_line(t, names, cols))
    return "\n".join(lines)


def prerequisites() -> list[str]:
    dirs = [*os.environ.get("PATH", "").split(":"), "/usr/sbin", "/sbin"]
    missing = [cmd for cmd in ("ip", "iptables", "nft", "trafgen", "taskset", "ethtool")
               if not any(Path(d, cmd).exists() for d in dirs)]
    problems = [f"command not found: {cmd}" for cmd in missing]
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces)")
    if (os.cpu_count() or 1) < 2:
        problems.append("needs 2 CPUs (sender on CPU 0, queue workers on CPU 1)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0].startswith("_"):
        role, rest = args_in[0], args_in[1:]
        if role == "_pac":
            peer_pac()
        elif role == "_pns":
            peer_pns()
        elif role == "_probe_rx":
            peer_probe_rx(int(rest[0]))
        elif role == "_probe_tx":
            peer_probe_tx(rest[0], rest[1], int(rest[2]), int(rest[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="rounds over every path (default 3)")
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="measuring window per figure (default 2, after 0.5 s warm-up)")
    ap.add_argument("--probes", type=int, default=500, help="latency probes per direction")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated, from {', '.join(PATHS)}")
    ap.add_argument("--json", metavar="PATH", help="write every figure here")
    ap.add_argument("--before", metavar="DIR", type=Path,
                    help="a natedit source tree (e.g. a git worktree of an earlier commit): "
                         "adds natedit-*-before paths running it, side by side")
    args = ap.parse_args(args_in)
    problems = prerequisites()
    if problems:
        for p in problems:
            say(f"bench.datapath: {p}")
        say("bench.datapath: apt-get install netsniff-ng iptables nftables ethtool util-linux")
        return 1
    paths = [p for p in args.paths.split(",") if p]
    if args.before is not None:
        if not (args.before / "natedit" / "__main__.py").is_file():
            ap.error(f"--before {args.before}: no natedit source tree there")
        paths += [p + BEFORE for p in paths if p.startswith("natedit-")
                  and not p.endswith(BEFORE) and p + BEFORE not in paths]
    unknown = {p.removesuffix(BEFORE) if args.before else p for p in paths} - set(PATHS)
    if unknown:
        ap.error(f"unknown paths: {', '.join(sorted(unknown))}")
    prefix = f"nb{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
    reps: list[dict[str, dict[str, Any]]] = []
    started = time.monotonic()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as tmpdir:
        try:
            for rep in range(args.repeat):
                order = paths[rep % len(paths):] + paths[:rep % len(paths)]
                figures: dict[str, dict[str, Any]] = {}
                for path in order:
                    say(f"[datapath] run {rep + 1}/{args.repeat} {path} ...", end="")
                    t0 = time.monotonic()
                    figures[path] = measure_path(path, prefix, Path(tmpdir), args.seconds,
                                                 args.probes, args.before)
                    f = figures[path]
                    say(" " + " ".join(f"{k}={f[k]['pps'] / 1000:.0f}k" for k in f
                                       if "pps" in f[k])
                        + f" lat={f['latency_out']['median_us']:.0f}/"
                          f"{f['latency_in']['median_us']:.0f}us"
                        + f" ({time.monotonic() - t0:.1f} s)")
                reps.append(figures)
        except KeyboardInterrupt:
            say("\n[datapath] interrupted; namespaces removed")
            return 130
    summary = summarize(reps, paths)
    text = table(summary, paths)
    print(text)
    print(f"\n{args.repeat} runs, {args.seconds:g} s per figure, {time.monotonic() - started:.0f} s"
          f" in all; {os.cpu_count()} CPUs; {run(['uname', '-r']).strip()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"command": "python -m bench.datapath " + " ".join(args_in), "paths": paths,
             "runs": reps, "summary": summary, "targets": targets(summary, paths),
             "table": text,
             "cpus": os.cpu_count(), "kernel": run(["uname", "-r"]).strip()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
