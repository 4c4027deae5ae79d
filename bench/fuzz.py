"""Fuzz the control parser, the stream framing, the GRE path and the worker, from real bytes.

    .venv/bin/python -m bench.fuzz --inputs 1000000            # the long check
    .venv/bin/python -m bench.fuzz --inputs 20000 --engine random   # CI-sized

Seeds come from a capture of real peers (``tests/data/pptp_seed.pcap``, made by
``python -m tests.harness.seeds``: pptpd and pptp-linux through natedit, both
sides of the gateway). Every input goes to one target, picked by its first
byte:

``control``  the bytes through ``parse_control_header`` and ``parse_control_message``.
``stream``   the bytes as one direction of a control connection, cut into
             segments where the input says, through ``frame()`` the way the
             translator commits it: a segment either frames or raises.
``packet``   the bytes as one IPv4 packet through ``Translator.handle_packet``,
             both directions, on a translator holding the capture's live calls.
``worker``   the bytes as a run of packets (a direction and clock byte, a
             2-byte length, the packet) through the worker's ``Dispatcher`` and
             its timers, on a copy of that translator.

The promise checked on every input: parsers return or raise ``ProtocolError``
with a reason of the closed set; ``handle_packet`` never raises and every
verdict is well formed (a drop has a reason; a rewrite keeps the length and
valid checksums); the call table's invariants hold; the Dispatcher counts no
``packet_error`` or ``timer_error``: the worker never stops.

Engines: ``atheris`` (libFuzzer, coverage-guided; ``pip install atheris``)
when it is installed, else ``random``: a seeded mutator (bit flips, bytes,
16-bit values that matter to PPTP at any offset, cuts, splices) over the
same seeds. A failing input is written to ``--crash-dir`` and ends the run
with status 1. The last lines printed are the counts (also ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import pickle
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from natedit import CallRecord, Direction, Policy, ProtocolError
from natedit.core.checksum import internet_checksum
from natedit.core.stream import Stream, frame
from natedit.core.translator import Translator
from natedit.core.wire import MAGIC_COOKIE, MESSAGE_LENGTH, parse_control_header
from natedit.core.wire import parse_control_message as _parse_message
from natedit.worker import Dispatcher
from tests.harness.queued import give
from tests.pptp_flows import assert_table_consistent
from tests.unit.test_fuzz_quick import PROTOCOL_REASONS, check_verdict

REPO = Path(__file__).resolve().parent.parent
SEED_PCAP = REPO / "tests" / "data" / "pptp_seed.pcap"
PUBLIC = "198.51.100.1"
OUT, IN = Direction.OUTBOUND, Direction.INBOUND
TARGETS = ("control", "stream", "packet", "worker")
RESET_EVERY = 256
"""Packet target: inputs between two fresh copies of the template translator."""
MAX_PACKET = 1600

Seeds = dict[str, list[bytes]]


# -- seeds -----------------------------------------------------------------------------------


def read_pcap(path: Path) -> list[bytes]:
    """The IPv4 packets of a classic pcap of LINKTYPE_RAW (101) or Ethernet (1)."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    strip = 14 if linktype == 1 else 0
    out, at = [], 24
    while at + 16 <= len(data):
        incl = struct.unpack_from(endian + "IIII", data, at)[2]
        packet = data[at + 16 + strip : at + 16 + incl]
        at += 16 + incl
        if packet and packet[0] >> 4 == 4:
            out.append(packet)
    return out


def direction_of(packet: bytes) -> Direction:
    return OUT if packet[12] == 10 else IN  # a private (10/8) source goes out


def tcp_payload(packet: bytes) -> tuple[int, int, bytes] | None:
    """(source port, destination port, payload) of a TCP packet."""
    if packet[9] != 6:
        return None
    ihl = (packet[0] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", packet, ihl)
    doff = (packet[ihl + 12] >> 4) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    return sport, dport, packet[ihl + doff : total]


def template_records(packets: list[bytes]) -> list[CallRecord]:
    """The capture's calls as natedit mapped them: inside OCRQ (client, port, private
    Call ID), outside OCRQ (public Call ID), outside OCRP (server Call ID)."""
    private: dict[int, tuple[str, int]] = {}
    public: dict[int, int] = {}
    server: dict[int, tuple[str, int]] = {}
    for p in packets:
        seg = tcp_payload(p)
        if seg is None or len(seg[2]) < 16:
            continue
        sport, dport, payload = seg
        with contextlib.suppress(ProtocolError):
            mt = parse_control_header(payload).message_type
            cid = struct.unpack_from("!H", payload, 12)[0]
            if mt == 7 and p[12] == 10:
                private[sport] = (str(ipaddress.IPv4Address(p[12:16])), cid)
            elif mt == 7:
                public[sport] = cid
            elif mt == 8 and p[16:20] == ipaddress.IPv4Address(PUBLIC).packed:
                server[dport] = (str(ipaddress.IPv4Address(p[12:16])), cid)
    records = []
    for port, (client, cid) in private.items():
        if port in public and port in server:
            records.append(CallRecord(
                ipaddress.IPv4Address(client), port, ipaddress.IPv4Address(server[port][0]),
                1723, ipaddress.IPv4Address(PUBLIC), public[port], cid >> 8, cid,
                server[port][1], "established"))
    return records


def load_seeds(path: Path) -> tuple[Seeds, list[CallRecord]]:
    packets = read_pcap(path)
    seeds: Seeds = {t: [] for t in TARGETS}
    streams: dict[tuple[bytes, int, bytes, int], bytes] = {}
    for p in packets:
        seeds["packet"].append(p)
        seg = tcp_payload(p)
        if seg is not None and seg[2]:
            key = (p[12:16], seg[0], p[16:20], seg[1])
            streams[key] = streams.get(key, b"") + seg[2]
            i = 0
            while i + 12 <= len(seg[2]):  # the messages, one by one
                n = struct.unpack_from("!H", seg[2], i)[0]
                if n < 12:
                    break
                seeds["control"].append(seg[2][i : i + n])
                i += n
    for data in streams.values():
        for cuts in ((), (1, 13, 14), (7, 100), tuple(range(1, len(data), 37))):
            seeds["stream"].append(bytes([len(cuts) & 0x0F]) + bytes(c & 0xFF for c in cuts)
                                   + data)
    for i in range(0, len(packets), 3):  # windows of the conversation, as the queues see it
        run = b""
        for p in packets[i : i + 8]:
            run += bytes([int(direction_of(p)) << 7 | (i & 0x03)]) + struct.pack("!H", len(p)) + p
        seeds["worker"].append(run)
    records = template_records(packets)
    return seeds, records


# -- targets ---------------------------------------------------------------------------------


def template(records: list[CallRecord]) -> Translator:
    policy = Policy(public_address=ipaddress.IPv4Address(PUBLIC), max_calls_per_client=8,
                    call_id_first=1, call_id_last=65535)
    tr = Translator(policy, rng=random.Random(1723))
    outcome = tr.restore(records, 0.0)
    assert outcome["restored"] == len(records), outcome
    return tr


class _Packet:
    """What the Dispatcher needs of a queued packet."""

    __slots__ = ("data",)
    id = 1

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_payload(self) -> bytes:
        return self.data

    def set_payload(self, payload: bytes) -> None:
        assert len(payload) == len(self.data)
        self.data = payload

    def accept(self) -> None:
        pass

    def drop(self) -> None:
        pass


class Fuzzer:
    """The four targets and their counters."""

    def __init__(self, records: list[CallRecord]) -> None:
        self._frozen = pickle.dumps(template(records))
        self._tr = self._fresh()
        self._since_reset = 0
        self.inputs: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    def _fresh(self) -> Translator:
        tr = pickle.loads(self._frozen)
        assert isinstance(tr, Translator)
        return tr

    def one(self, data: bytes) -> None:
        if not data:
            return
        target = TARGETS[data[0] % len(TARGETS)]
        self.inputs[target] += 1
        getattr(self, f"fuzz_{target}")(data[1:])

    def fuzz_control(self, data: bytes) -> None:
        for fn in (parse_control_header, _parse_message):
            try:
                fn(data)
            except ProtocolError as exc:
                assert exc.reason in PROTOCOL_REASONS, exc.reason
                self.reasons[exc.reason] += 1

    def fuzz_stream(self, data: bytes) -> None:
        if not data:
            return
        n = data[0] & 0x0F
        cuts = sorted({c for c in data[1 : 1 + n]})
        body = data[1 + n :]
        stream = Stream()
        start = 0
        for end in [*[c for c in cuts if 0 < c < len(body)], len(body)]:
            segment = body[start:end]
            start = end
            try:
                pieces, pending, header = frame(stream, segment)
            except ProtocolError as exc:
                assert exc.reason in PROTOCOL_REASONS, exc.reason
                self.reasons[exc.reason] += 1
                continue  # dropped: the stream is as it was
            for piece in pieces:
                assert piece.header.length == MESSAGE_LENGTH[piece.header.message_type]
                assert len(piece.message) <= piece.header.length
                assert piece.message[4:8] == struct.pack("!I", MAGIC_COOKIE)
            assert len(pending) < max(MESSAGE_LENGTH.values())
            assert (header is None) == (len(pending) < 12)
            stream.pending, stream.header = pending, header

    def fuzz_packet(self, data: bytes) -> None:
        self._since_reset += 1
        if self._since_reset >= RESET_EVERY:
            self._tr, self._since_reset = self._fresh(), 0
        tr = self._tr
        for d in (OUT, IN):
            v = tr.handle_packet(data, d, 1.0)
            check_verdict(v, data)
            self.reasons[v.reason or ("rewritten" if v.data else "accept")] += 1
        assert_table_consistent(tr.table, one_to_one=tr.table.relaxed == 0)

    def fuzz_worker(self, data: bytes) -> None:
        tr = self._fresh()
        now = [1.0]
        dispatcher = Dispatcher(tr, clock=lambda: now[0])
        i = 0
        while i + 3 <= len(data):
            flags = data[i]
            length = struct.unpack_from("!H", data, i + 1)[0] % MAX_PACKET
            packet = data[i + 3 : i + 3 + length]
            i += 3 + length
            now[0] += (0.0, 0.5, 61.0, 301.0)[flags & 0x03]
            dispatcher.run_timers()
            give(dispatcher.packets, _Packet(packet), IN if flags & 0x80 else OUT)
        assert not dispatcher.counts, dispatcher.counts  # no packet_error, no timer_error
        for (_action, reason), n in tr.stats.verdicts.items():
            self.reasons[reason] += n
        self.reasons["rewritten"] += sum(tr.stats.gre_packets) + sum(tr.stats.rewrites.values())
        assert_table_consistent(tr.table, one_to_one=tr.table.relaxed == 0)


# -- engines ---------------------------------------------------------------------------------

INTERESTING_U16 = sorted({0, 1, 2, 11, 12, 13, 0x7F, 0x80, 0xFF, 0x100, 0x1234, 0x7FFF, 0x8000,
                          0xFFFE, 0xFFFF, 0x880B, 0x1A2B, 0x3C4D, 1723,
                          *MESSAGE_LENGTH.values(), *range(16)})


def mutate(rng: random.Random, data: bytes, pool: list[bytes], live_ids: list[int]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(9)
        if not buf:
            buf += rng.randbytes(rng.randint(1, 32))
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.randrange(256)
        elif op in (2, 3):
            value = rng.choice(INTERESTING_U16 if op == 2 or not live_ids else live_ids)
            buf[pos : pos + 2] = struct.pack("!H", value)[: len(buf) - pos]
        elif op == 4:
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 5:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 24))
        elif op == 6:
            other = rng.choice(pool)
            at = rng.randrange(len(other) + 1)
            buf[pos:] = other[at:]
        elif op == 7:
            end = min(len(buf), pos + rng.randint(1, 16))
            del buf[pos:end]
        else:
            end = min(len(buf), pos + rng.randint(1, 16))
            buf[pos:pos] = buf[pos:end]
    return bytes(buf[: 8 * MAX_PACKET])


def fix_ip(packet: bytes) -> bytes:
    """``packet`` with its IPv4 total length and IP (and TCP) checksums made right again,
    so that a mutation deep inside gets past the first checks."""
    buf = bytearray(packet)
    if len(buf) < 20 or buf[0] >> 4 != 4:
        return packet
    ihl = (buf[0] & 0x0F) * 4
    if ihl < 20 or ihl > len(buf):
        return packet
    struct.pack_into("!H", buf, 2, len(buf))
    struct.pack_into("!H", buf, 10, 0)
    struct.pack_into("!H", buf, 10, internet_checksum(bytes(buf[:ihl])))
    if buf[9] == 6 and len(buf) >= ihl + 20:
        struct.pack_into("!H", buf, ihl + 16, 0)
        seg = bytes(buf[ihl:])
        pseudo = bytes(buf[12:20]) + struct.pack("!BBH", 0, 6, len(seg))
        struct.pack_into("!H", buf, ihl + 16, internet_checksum(pseudo + seg))
    return bytes(buf)


def split_run(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i + 3 <= len(data):
        length = struct.unpack_from("!H", data, i + 1)[0] % MAX_PACKET
        out.append((data[i], data[i + 3 : i + 3 + length]))
        i += 3 + length
    return out


def join_run(run: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([f]) + struct.pack("!H", len(p)) + p for f, p in run)


def mutate_input(rng: random.Random, data: bytes, pool: list[bytes],
                 live_ids: list[int]) -> bytes:
    """Mutate one input (its first byte, the target, stays); packets keep their shape."""
    target, body = TARGETS[data[0] % len(TARGETS)], data[1:]
    if target == "packet":
        body = mutate(rng, body, pool, live_ids)
        if rng.random() < 0.7:
            body = fix_ip(body)
    elif target == "worker":
        run = split_run(body)
        packets = [p for _, p in split_run(rng.choice(pool)[1:])] or [b""]
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(5)
            i = rng.randrange(len(run)) if run else 0
            if op <= 1 and run:
                flags, packet = run[i]
                packet = mutate(rng, packet, packets, live_ids)
                run[i] = (flags, fix_ip(packet) if rng.random() < 0.7 else packet)
            elif op == 2 and run:
                run[i] = (rng.randrange(256), run[i][1])  # direction and clock step
            elif op == 3:
                run.insert(i, (rng.randrange(256), rng.choice(packets)))
            elif run:
                del run[i]
        body = join_run(run)
    else:
        body = mutate(rng, body, pool, live_ids)
    return data[:1] + body


def run_random(fuzzer: Fuzzer, seeds: Seeds, records: list[CallRecord], inputs: int,
               seed: int, crash_dir: Path, progress: Callable[[int], None]) -> int:
    rng = random.Random(seed)
    live_ids = [r.public_call_id for r in records] + [r.client_call_id or 0 for r in records]
    pools = [[bytes([i]) + s for s in seeds[t]] for i, t in enumerate(TARGETS)]
    for n in range(inputs):
        pool = pools[n % len(TARGETS)]
        base = rng.choice(pool)
        data = base if rng.random() < 0.02 else mutate_input(rng, base, pool, live_ids)
        try:
            fuzzer.one(data)
        except Exception:
            crash_dir.mkdir(parents=True, exist_ok=True)
            path = crash_dir / f"crash-{n}"
            path.write_bytes(data)
            traceback.print_exc()
            print(f"fuzz: input {n} failed; written to {path}", file=sys.stderr)
            return 1
        progress(n + 1)
    return 0


def run_atheris(fuzzer: Fuzzer, seeds: Seeds, inputs: int, seed: int, crash_dir: Path,
                progress: Callable[[int], None]) -> int:
    import atheris

    corpus = Path(tempfile.mkdtemp(prefix="natedit-fuzz-corpus-"))
    for i, target in enumerate(TARGETS):
        for j, s in enumerate(seeds[target]):
            (corpus / f"{target}-{j}").write_bytes(bytes([i]) + s)
    crash_dir.mkdir(parents=True, exist_ok=True)
    count = [0]

    def one(data: bytes) -> None:
        fuzzer.one(data)
        count[0] += 1
        progress(count[0])

    atheris.instrument_all()
    argv = [sys.argv[0], f"-runs={inputs}", f"-seed={seed}", f"-max_len={8 * MAX_PACKET}",
            f"-artifact_prefix={crash_dir}/", "-print_final_stats=1", str(corpus)]
    atheris.Setup(argv, one)
    atheris.Fuzz()  # libFuzzer exits the process itself
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fuzz natedit from a real capture")
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    parser.add_argument("--seed", type=int, default=1723)
    parser.add_argument("--seed-pcap", type=Path, default=SEED_PCAP)
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--json", type=Path, help="write the counts here too")
    args = parser.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "random"
        else:
            engine = "atheris"
    logging.getLogger("natedit").setLevel(logging.CRITICAL + 1)  # the worker's event lines
    seeds, records = load_seeds(args.seed_pcap)
    fuzzer = Fuzzer(records)
    started = time.monotonic()
    step = max(1, args.inputs // 20)

    def report(final: bool) -> dict[str, object]:
        seconds = time.monotonic() - started
        done = sum(fuzzer.inputs.values())
        counts: dict[str, object] = {
            "engine": engine, "inputs": done, "seconds": round(seconds, 1),
            "inputs_per_second": round(done / seconds) if seconds else None,
            "by_target": dict(fuzzer.inputs), "failures": 0,
            "seeds": {t: len(s) for t, s in seeds.items()}, "live_calls": len(records),
            "reasons": dict(fuzzer.reasons.most_common()),
        }
        line = json.dumps(counts if final else {k: counts[k] for k in ("inputs", "seconds")})
        print(f"fuzz: {'done' if final else 'progress'} {line}", file=sys.stderr, flush=True)
        if final and args.json is not None:
            args.json.write_text(json.dumps(counts, indent=1) + "\n")
        return counts

    def progress(n: int) -> None:
        if n == args.inputs:
            report(True)
        elif n % step == 0:
            report(False)

    if engine == "atheris":
        return run_atheris(fuzzer, seeds, args.inputs, args.seed, args.crash_dir, progress)
    return run_random(fuzzer, seeds, records, args.inputs, args.seed, args.crash_dir, progress)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
