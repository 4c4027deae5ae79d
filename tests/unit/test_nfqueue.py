"""natedit.nfqueue's callback, the per-packet path of the user-space datapath, with
NetfilterQueue packets stood in for: the shortcut's hit and miss, and trouble after
the shortcut translated (and counted) a packet."""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest

from natedit import nfqueue
from natedit.core.events import Event
from natedit.core.translator import Translator
from natedit.core.wire import MessageType, build_control_message, build_gre
from natedit.nfqueue import PacketPath
from tests.harness.queued import FakePacket, OwnVerdicts
from tests.pptp_flows import IN, OUT, PUBLIC, SERVER, Conversation, establish, make_translator

CLIENT = "10.0.0.11"
SERVER_CALL_ID = 0x0100


@dataclass
class Setup:
    translator: Translator
    path: PacketPath
    public_call_id: int
    counts: Counter[str]
    events: list[Event]
    trouble: list[tuple[str, str]]


@pytest.fixture
def setup() -> Setup:
    tr = make_translator()
    conv = Conversation(tr, CLIENT, client_port=40000)
    conv.open()
    public = establish(conv, 0x1234, SERVER_CALL_ID)
    counts: Counter[str] = Counter()
    events: list[Event] = []
    trouble: list[tuple[str, str]] = []

    def on_events(new: Iterable[Event]) -> None:
        events.extend(new)

    path = PacketPath(tr, lambda: 50.0, counts, on_events,
                      lambda kind, what: trouble.append((kind, what)))
    return Setup(tr, path, public, counts, events, trouble)


def test_shortcut_hit_both_ways(setup: Setup) -> None:
    tr = setup.translator
    out = FakePacket(build_gre(CLIENT, SERVER, SERVER_CALL_ID, bytes(64)))
    setup.path.callback(OUT, OwnVerdicts(out))(out)
    assert out.calls == ["get_payload", "set_payload", "accept"]
    assert out.given is not None and out.given[12:16] == bytes([198, 51, 100, 1])
    inbound = FakePacket(build_gre(SERVER, PUBLIC, setup.public_call_id, bytes(64)))
    setup.path.callback(IN, OwnVerdicts(inbound))(inbound)
    assert inbound.calls == ["get_payload", "set_payload", "accept"]
    assert inbound.given is not None and inbound.given[16:20] == bytes([10, 0, 0, 11])
    assert tr.stats.gre_packets == [1, 1]
    (call,) = tr.table.calls()
    assert call.gre_packets == [1, 1] and call.last_seen == 50.0
    assert not setup.counts and not setup.trouble


def test_shortcut_miss_goes_through_the_full_path_once(setup: Setup) -> None:
    tr = setup.translator
    before = sum(tr.stats.verdicts.values())
    unknown = FakePacket(build_gre(SERVER, PUBLIC, setup.public_call_id ^ 1, bytes(64)))
    setup.path.callback(IN, OwnVerdicts(unknown))(unknown)
    assert unknown.calls == ["get_payload", "drop"]  # the payload is read once
    assert sum(tr.stats.verdicts.values()) == before + 1
    assert tr.stats.gre_packets == [0, 0]
    assert not setup.counts and not setup.trouble


def test_short_packet_the_shortcut_cannot_read_goes_to_the_full_path(setup: Setup) -> None:
    short = FakePacket(b"\x45\x00")
    setup.path.callback(OUT, OwnVerdicts(short))(short)
    assert short.calls[-1] == "drop"
    assert not setup.counts


@pytest.mark.parametrize("fail", ["set_payload", "accept"])
def test_trouble_after_the_shortcut_counts_the_packet_once(setup: Setup, fail: str) -> None:
    tr = setup.translator
    before = sum(tr.stats.verdicts.values())
    packet = FakePacket(build_gre(CLIENT, SERVER, SERVER_CALL_ID, bytes(64)), fail=fail)
    setup.path.callback(OUT, OwnVerdicts(packet))(packet)
    assert packet.calls[-1] == "drop"  # still a verdict: not accepted untranslated
    assert "accept" not in packet.calls
    assert tr.stats.gre_packets == [1, 0]  # counted once, by the shortcut
    (call,) = tr.table.calls()
    assert call.gre_packets == [1, 0]
    assert sum(tr.stats.verdicts.values()) == before  # the full path never saw it
    assert setup.counts == Counter(packet_error=1)
    assert setup.trouble == [("packet_error", "outbound packet dropped")]


def test_trouble_on_the_full_path_drops_and_counts(setup: Setup) -> None:
    packet = FakePacket(build_gre(SERVER, PUBLIC, 0x7777, bytes(8)), fail="drop")
    setup.path.callback(IN, OwnVerdicts(packet))(packet)  # drop raised once; the retry drops
    assert packet.calls == ["get_payload", "drop"]
    assert setup.counts == Counter(packet_error=1)
    assert setup.trouble == [("packet_error", "inbound packet dropped")]


# -- the bounded reader (the loop's liveness under a flood) ---------------------------------


class LibQueue:
    """A bound queue stood in for: ``run(block=False)`` as NetfilterQueue 1.1 has it
    (``recv`` until EAGAIN, the callback once per message; an exception in the callback
    ends the loop and comes out of ``run``). ``flood``: another packet is always
    waiting, a copy of ``flood``."""

    def __init__(self, flood: bytes | None = None) -> None:
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.a.setblocking(False)
        self.flood = flood
        self.callback: Callable[[FakePacket], None] = lambda packet: None
        self.handled = 0

    def get_fd(self) -> int:
        return self.a.fileno()

    def run(self, block: bool = True) -> None:
        assert not block
        while True:
            if self.flood is not None:
                self.b.send(self.flood)
            try:
                data = self.a.recv(4096)
            except BlockingIOError:
                return
            self.handled += 1
            self.callback(FakePacket(data, id=self.handled))

    def close(self) -> None:
        self.a.close()
        self.b.close()


def test_the_reader_returns_to_the_loop_under_a_flood(setup: Setup) -> None:
    """The library's run(block=False) returns only once the socket is empty: under a
    steady flood the loop never came back to its timers, flush or signals. The batched
    callback ends the library's loop (TurnOver) once the turn's batch is full, and the
    Reader sends the batch: BATCH packets per turn, whatever is waiting."""
    queue = LibQueue(flood=build_gre(CLIENT, SERVER, SERVER_CALL_ID, bytes(64)))
    v = nfqueue.Verdicts(1723)
    queue.callback = setup.path.callback(OUT, v)
    reader = nfqueue.Reader(queue, v)
    v.sock = sink = Sink()  # (the Reader gave it the queue's socket; stand one in)
    try:
        for turn in range(1, 4):
            reader.drain()
            assert queue.handled == turn * nfqueue.BATCH
            assert v.sent == turn * nfqueue.BATCH and not v.parts
        assert reader.full_turns == 3
        ids = [m[2] for w in sink.writes for m in parse_verdicts(w)]
        assert ids == list(range(1, 3 * nfqueue.BATCH + 1))
        assert setup.translator.stats.gre_packets == [3 * nfqueue.BATCH, 0]
        assert not setup.counts and not setup.trouble  # ending a turn is no trouble
    finally:
        reader.close()
        queue.close()


def test_the_reader_stops_when_the_queue_is_empty(setup: Setup) -> None:
    queue = LibQueue()
    v = nfqueue.Verdicts(1723)
    queue.callback = setup.path.callback(OUT, v)
    reader = nfqueue.Reader(queue, v)
    v.sock = sink = Sink()
    try:
        for _ in range(3):
            queue.b.send(build_gre(CLIENT, SERVER, SERVER_CALL_ID, bytes(64)))
        reader.drain()
        assert queue.handled == 3 and reader.full_turns == 0
        assert [m[2] for w in sink.writes for m in parse_verdicts(w)] == [1, 2, 3]
    finally:
        reader.close()
        queue.close()


def test_the_batched_callback_ends_the_turn_after_the_packet_that_fills_it(
        setup: Setup) -> None:
    """TurnOver comes after the packet's verdict and, on the full path, after its
    events were handed on; it is no Exception, so nothing on the way counts it."""
    v = nfqueue.Verdicts(1723)
    v.sock = sink = Sink()
    v.room = 2
    callback = setup.path.callback(IN, v)
    callback(FakePacket(build_gre(SERVER, PUBLIC, setup.public_call_id, bytes(64)), id=1))
    conv = Conversation(setup.translator, "10.0.0.12", client_port=40001)
    conv.open()
    request = conv.segment(OUT, build_control_message(MessageType.OUTGOING_CALL_REQUEST,
                                                      call_id=0x55))
    before = len(setup.events)
    with pytest.raises(nfqueue.TurnOver):
        setup.path.callback(OUT, v)(FakePacket(request, id=2))  # the full path's packet
    assert not issubclass(nfqueue.TurnOver, Exception)
    assert len(setup.events) > before  # its events were handed on before
    v.send()
    assert [m[2] for m in parse_verdicts(sink.writes[0])] == [1, 2]
    assert not setup.counts and not setup.trouble


# -- verdicts in batches (one netlink write per queue and turn) ----------------------------


class Sink:
    """A netlink socket stood in for: what was written; ``fail`` writes raise."""

    def __init__(self, fail: int = 0, refuse: Callable[[bytes], bool] | None = None) -> None:
        self.writes: list[bytes] = []
        self.fail = fail
        self.refuse = refuse

    def sendmsg(self, parts: list[bytes]) -> int:
        assert len(parts) <= nfqueue.IOV_MAX
        return self.send(b"".join(parts))

    def send(self, data: bytes) -> int:
        if self.fail:
            self.fail -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if self.refuse is not None and self.refuse(data):
            raise OSError(errno.EINVAL, "Invalid argument")
        self.writes.append(data)
        return len(data)


def parse_verdicts(data: bytes) -> list[tuple[int, int, int, bytes | None]]:
    """(queue number, verdict, packet id, new bytes or None) of each netlink message,
    checked as the kernel reads them: NLMSG_ALIGN'ed, one verdict header, lengths exact."""
    out = []
    at = 0
    while at < len(data):
        assert at % 4 == 0
        length, mtype, flags, _seq, pid = struct.unpack_from("=IHHII", data, at)
        assert (mtype, flags, pid) == (nfqueue.NFQNL_MSG_VERDICT, nfqueue.NLM_F_REQUEST, 0)
        family, version, res_id = struct.unpack_from("=BB2s", data, at + 16)
        assert (family, version) == (0, 0)
        alen, atype = struct.unpack_from("=HH", data, at + 20)
        assert (alen, atype) == (12, nfqueue.NFQA_VERDICT_HDR)
        verdict, packet_id = struct.unpack_from("!II", data, at + 24)
        payload = None
        if length > 32:
            plen, ptype = struct.unpack_from("=HH", data, at + 32)
            assert ptype == nfqueue.NFQA_PAYLOAD and plen == length - 32
            payload = data[at + 36:at + length]
        else:
            assert length == 32
        out.append((int.from_bytes(res_id, "big"), verdict, packet_id, payload))
        at += (length + 3) & ~3
    assert at == len(data)
    return out


def test_verdicts_are_the_kernels_messages_one_after_the_other() -> None:
    v = nfqueue.Verdicts(1724)
    v.sock = sink = Sink()
    odd = bytes(range(101))  # not a multiple of 4: padded to the next message
    v.accept(70000, odd)
    v.accept(2)
    v.drop(3)
    v.accept(4, b"\x45" * 64)
    assert not sink.writes  # nothing before the turn ends
    v.send()
    (write,) = sink.writes
    assert parse_verdicts(write) == [(1724, nfqueue.NF_ACCEPT, 70000, odd),
                                     (1724, nfqueue.NF_ACCEPT, 2, None),
                                     (1724, nfqueue.NF_DROP, 3, None),
                                     (1724, nfqueue.NF_ACCEPT, 4, b"\x45" * 64)]
    assert v.sent == 4
    v.send()  # nothing pending: nothing written
    assert len(sink.writes) == 1


def test_verdicts_go_out_in_chunks_and_count_down_the_turns_room() -> None:
    v = nfqueue.Verdicts(1723)
    v.sock = sink = Sink()
    v.room = 200
    big = bytes(1400)
    for i in range(100):
        v.accept(i, big)
    assert sink.writes and all(len(w) <= nfqueue.CHUNK + 1440 for w in sink.writes)
    v.send()
    assert [m[2] for w in sink.writes for m in parse_verdicts(w)] == list(range(100))
    assert v.room == 100
    for i in range(100, 200):
        v.drop(i)
    assert v.room == 0  # the batched callback ends the turn here (TurnOver)


def test_a_refused_write_is_retried_message_by_message_and_counted() -> None:
    counts: Counter[str] = Counter()
    trouble: list[str] = []
    v = nfqueue.Verdicts(1723, counts, trouble.append)
    v.sock = Sink(fail=1, refuse=lambda data: struct.unpack_from("!I", data, 28)[0] == 2)
    for i in (1, 2, 3):
        v.accept(i, bytes(30))
    v.send()
    assert [m[2] for w in v.sock.writes for m in parse_verdicts(w)] == [1, 3]
    assert v.sent == 2
    assert counts == Counter(packet_error=1)
    assert len(trouble) == 1 and "not taken by the kernel" in trouble[0]


def test_batched_shortcut_hit_and_miss(setup: Setup) -> None:
    tr = setup.translator
    v = nfqueue.Verdicts(1723)
    v.sock = sink = Sink()
    hit = FakePacket(build_gre(CLIENT, SERVER, SERVER_CALL_ID, bytes(64)), id=11)
    miss = FakePacket(build_gre(SERVER, PUBLIC, setup.public_call_id ^ 1, bytes(64)), id=12)
    inbound = FakePacket(build_gre(SERVER, PUBLIC, setup.public_call_id, bytes(64)), id=13)
    setup.path.callback(OUT, v)(hit)
    setup.path.callback(IN, v)(miss)
    setup.path.callback(IN, v)(inbound)
    assert hit.calls == miss.calls == inbound.calls == ["get_payload"]  # no own verdict
    v.send()
    (a, b, c) = parse_verdicts(sink.writes[0])
    assert a[1:3] == (nfqueue.NF_ACCEPT, 11) and a[3] is not None
    assert a[3][12:16] == bytes([198, 51, 100, 1])
    assert b[1:] == (nfqueue.NF_DROP, 12, None)  # no call: the full path's drop
    assert c[1:3] == (nfqueue.NF_ACCEPT, 13) and c[3] is not None
    assert c[3][16:20] == bytes([10, 0, 0, 11])
    assert tr.stats.gre_packets == [1, 1]
    assert not setup.counts and not setup.trouble


def test_batched_trouble_after_the_shortcut_drops_once(setup: Setup) -> None:
    v = nfqueue.Verdicts(1723)
    v.sock = sink = Sink()
    calls = []

    def broken(packet_id: int, payload: bytes | None = None) -> None:
        calls.append(packet_id)
        raise RuntimeError("accept failed")

    v.accept = broken  # type: ignore[method-assign]
    packet = FakePacket(build_gre(CLIENT, SERVER, SERVER_CALL_ID, bytes(64)), id=21)
    setup.path.callback(OUT, v)(packet)
    v.send()
    assert calls == [21]
    assert parse_verdicts(sink.writes[0]) == [(1723, nfqueue.NF_DROP, 21, None)]
    assert setup.translator.stats.gre_packets == [1, 0]  # counted once, by the shortcut
    assert setup.counts == Counter(packet_error=1)


def test_batched_full_path_trouble_after_its_verdict_gives_no_second(setup: Setup) -> None:
    """An exception after the full path's verdict (in the events' handling) is counted,
    and no second verdict is sent for the packet."""
    v = nfqueue.Verdicts(1723)
    v.sock = sink = Sink()

    def on_events(new: Iterable[Event]) -> None:
        raise RuntimeError("events failed")

    path = PacketPath(setup.translator, lambda: 50.0, setup.counts, on_events,
                      lambda kind, what: setup.trouble.append((kind, what)))
    conv = Conversation(setup.translator, "10.0.0.12", client_port=40001)
    conv.open()
    request = conv.segment(OUT, build_control_message(MessageType.OUTGOING_CALL_REQUEST,
                                                      call_id=0x55))
    packet = FakePacket(request, id=31)  # its verdict has an event (the call mapped)
    path.callback(OUT, v)(packet)
    v.send()
    verdicts = parse_verdicts(sink.writes[0])
    assert [m[2] for m in verdicts] == [31]
    assert setup.counts == Counter(packet_error=1)


def test_a_quiet_queue_sends_each_verdict_at_once_a_busy_one_batches() -> None:
    """After a turn of at most one packet, verdicts go out as they are given (a lone
    packet does not wait for the recv that ends the turn); a turn of more packets
    turns the batches back on."""
    queue = LibQueue()
    v = nfqueue.Verdicts(1723)
    seen_at_verdict: list[int] = []

    def callback(packet: FakePacket) -> None:
        v.accept(packet.id)
        seen_at_verdict.append(len(sink.writes))  # written by now

    queue.callback = callback
    reader = nfqueue.Reader(queue, v)
    v.sock = sink = Sink()
    try:
        queue.b.send(b"x")
        reader.drain()  # the first turn batches: written at its end
        assert seen_at_verdict == [0] and len(sink.writes) == 1 and v.limit == 0
        seen_at_verdict.clear()
        for _ in range(3):
            queue.b.send(b"x")
        reader.drain()  # quiet before: each verdict written as given
        assert seen_at_verdict == [2, 3, 4] and len(sink.writes) == 4
        assert v.limit == nfqueue.CHUNK  # three packets: busy again
        seen_at_verdict.clear()
        for _ in range(3):
            queue.b.send(b"x")
        reader.drain()
        assert seen_at_verdict == [4, 4, 4] and len(sink.writes) == 5
        assert [m[2] for w in sink.writes for m in parse_verdicts(w)] == list(range(1, 8))
    finally:
        reader.close()
        queue.close()
