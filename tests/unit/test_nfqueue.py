"""natedit.nfqueue's callback, the per-packet path of the user-space datapath, with
NetfilterQueue packets stood in for: the shortcut's hit and miss, and trouble after
the shortcut translated (and counted) a packet."""

from __future__ import annotations

import errno
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from natedit import nfqueue
from natedit.core.events import Event
from natedit.core.translator import Translator
from natedit.core.wire import build_gre
from natedit.nfqueue import PacketPath
from tests.harness.queued import FakePacket
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
    setup.path.callback(OUT)(out)
    assert out.calls == ["get_payload", "set_payload", "accept"]
    assert out.given is not None and out.given[12:16] == bytes([198, 51, 100, 1])
    inbound = FakePacket(build_gre(SERVER, PUBLIC, setup.public_call_id, bytes(64)))
    setup.path.callback(IN)(inbound)
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
    setup.path.callback(IN)(unknown)
    assert unknown.calls == ["get_payload", "drop"]  # the payload is read once
    assert sum(tr.stats.verdicts.values()) == before + 1
    assert tr.stats.gre_packets == [0, 0]
    assert not setup.counts and not setup.trouble


def test_short_packet_the_shortcut_cannot_read_goes_to_the_full_path(setup: Setup) -> None:
    short = FakePacket(b"\x45\x00")
    setup.path.callback(OUT)(short)
    assert short.calls[-1] == "drop"
    assert not setup.counts


@pytest.mark.parametrize("fail", ["set_payload", "accept"])
def test_trouble_after_the_shortcut_counts_the_packet_once(setup: Setup, fail: str) -> None:
    tr = setup.translator
    before = sum(tr.stats.verdicts.values())
    packet = FakePacket(build_gre(CLIENT, SERVER, SERVER_CALL_ID, bytes(64)), fail=fail)
    setup.path.callback(OUT)(packet)
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
    setup.path.callback(IN)(packet)  # the verdict drop raised once; the retry drops
    assert packet.calls == ["get_payload", "drop"]
    assert setup.counts == Counter(packet_error=1)
    assert setup.trouble == [("packet_error", "inbound packet dropped")]


# -- the bounded reader (the loop's liveness under a flood) ---------------------------------


class FloodQueue:
    """A queue that always has packets: run_socket as NetfilterQueue 1.1 has it (recv
    until EAGAIN/EWOULDBLOCK, ENOBUFS skipped), counting what it handed the callback."""

    def __init__(self) -> None:
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.handled = 0

    def get_fd(self) -> int:
        return self.a.fileno()

    def run_socket(self, s: nfqueue.Reader) -> None:
        while True:
            self.b.send(b"p" * 60)  # the flood: another packet is always waiting
            try:
                s.recv(4096)
            except OSError as e:
                if e.args[0] == errno.ENOBUFS:
                    continue
                if e.args[0] in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                raise
            self.handled += 1


def test_the_reader_returns_to_the_loop_under_a_flood() -> None:
    """run(block=False) returns only once the socket is empty: under a steady flood the
    loop never came back to its timers, flush or signals. A Reader hands the callback
    at most BATCH packets per turn, whatever is waiting."""
    queue = FloodQueue()
    reader = nfqueue.Reader(queue)
    try:
        for turn in range(1, 4):
            reader.drain()
            assert queue.handled == turn * nfqueue.BATCH
        assert reader.full_turns == 3
    finally:
        reader.close()
        queue.a.close()
        queue.b.close()


def test_the_reader_stops_when_the_queue_is_empty() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    class Quiet:
        def get_fd(self) -> int:
            return a.fileno()

        def run_socket(self, s: nfqueue.Reader) -> None:
            n = 0
            while True:
                try:
                    s.recv(4096)
                except BlockingIOError:
                    break
                n += 1
            self.n = n

    for _ in range(3):
        b.send(b"x")
    quiet = Quiet()
    reader = nfqueue.Reader(quiet)
    try:
        reader.drain()
        assert quiet.n == 3 and reader.full_turns == 0
    finally:
        reader.close()
        a.close()
        b.close()
