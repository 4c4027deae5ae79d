"""The live event stream (natedit events): per-subscriber bounded queues, a slow reader
loses events (counted, and told where), a fast one loses none; filters; the CLI.

The server runs on an abstract unix socket of a unique name, so nothing is left on
disk and no running natedit is touched.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from prometheus_client import CollectorRegistry

from natedit import NateditError, cli, eventstream
from natedit.core.errors import Refusal, ReleaseReason
from natedit.core.events import Action, CallInfo, CallMapped, CallRefused, CallReleased, Verdict
from natedit.core.wire import Direction
from natedit.eventstream import EventHub, EventServer, Filter
from natedit.worker import Dispatcher
from tests.harness.queued import give

CLIENT, SERVER, PUBLIC = "10.0.0.2", "198.51.100.2", "198.51.100.1"


def call(i: int, state: str = "established") -> CallInfo:
    return CallInfo(IPv4Address(CLIENT), 0x1234, IPv4Address(SERVER), i, IPv4Address(PUBLIC),
                    0x4000 + i, state)


def unique_name() -> str:
    return f"@natedit-test-events-{os.getpid()}-{time.monotonic_ns()}"


@pytest.fixture
def served() -> Iterator[tuple[str, EventHub]]:
    name, hub = unique_name(), EventHub(queue_size=8)
    with EventServer(name, hub):
        yield name, hub


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def connect(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(eventstream.address(name))
    return sock


def test_publish_without_subscribers_does_nothing() -> None:
    hub = EventHub(clock=lambda: pytest.fail("no clock read without subscribers"))
    hub.publish([CallMapped(call(1))])
    assert hub.lost_total == 0


def test_a_full_queue_loses_events_counted() -> None:
    hub = EventHub(queue_size=3, clock=lambda: 5.0)
    sub = hub.subscribe()
    assert sub is not None
    hub.publish([CallMapped(call(i)) for i in range(5)])
    assert sub.queue.qsize() == 3 and sub.lost == 2 and hub.lost_total == 2
    assert [sub.queue.get()[2] for _ in range(3)] == [0, 0, 0]  # lost before each: none
    hub.publish([CallMapped(call(9))])
    assert sub.queue.get()[2] == 2  # the gap comes before this one
    reg = CollectorRegistry()
    reg.register(hub)
    assert reg.get_sample_value("natedit_events_lost_total") == 2
    assert reg.get_sample_value("natedit_event_subscribers") == 1
    hub.unsubscribe(sub)
    assert hub.subscribers == ()


def test_subscribers_are_bounded() -> None:
    hub = EventHub(max_subscribers=2)
    assert hub.subscribe() and hub.subscribe()
    assert hub.subscribe() is None


def test_slow_subscriber_loses_events_fast_one_gets_all(
        served: tuple[str, EventHub]) -> None:
    """A reader that stops reading loses events (its queue of 8 fills once its socket is
    full), an events_lost line says how many where they went missing; a reader that keeps
    up gets every event, in order; the worker's side never waits."""
    name, hub = served
    fast_lines: list[dict[str, object]] = []
    fast_done = threading.Event()
    total = 3000

    def read_fast() -> None:
        for entry in eventstream.lines(name):
            fast_lines.append(entry)
            if len(fast_lines) == total:
                fast_done.set()
                return

    reader = threading.Thread(target=read_fast, daemon=True)
    reader.start()
    wait_for(lambda: len(hub.subscribers) == 1)
    fast = hub.subscribers[0]
    slow_sock = connect(name)  # reads nothing until the end
    wait_for(lambda: len(hub.subscribers) == 2)
    slow = hub.subscribers[1]
    for i in range(0, total, 4):  # paced by the fast reader, never by the slow one
        hub.publish([CallMapped(call(n)) for n in range(i, min(i + 4, total))])
        wait_for(fast.queue.empty)
    assert fast_done.wait(20)
    assert fast.lost == 0
    assert [e["server_call_id"] for e in fast_lines] == list(range(total))
    assert slow.lost > 0 and hub.lost_total == slow.lost

    slow_sock.settimeout(10)
    got: list[dict[str, object]] = []
    with slow_sock, slow_sock.makefile("rb") as stream:
        while sum(1 for e in got if e["event"] != "events_lost") + sum(
                int(str(e["count"])) for e in got if e["event"] == "events_lost") < total:
            got.append(json.loads(stream.readline()))
    events = [e for e in got if e["event"] == "call_mapped"]
    gaps = [e for e in got if e["event"] == "events_lost"]
    assert gaps and sum(int(str(g["count"])) for g in gaps) == slow.lost
    ids = [int(str(e["server_call_id"])) for e in events]
    assert ids == sorted(ids) and len(ids) + slow.lost == total
    # each gap line stands where events are missing
    position = 0
    for entry in got:
        if entry["event"] == "events_lost":
            position += int(str(entry["count"]))
        else:
            assert entry["server_call_id"] == position
            position += 1


def test_a_reader_that_leaves_is_unsubscribed(served: tuple[str, EventHub]) -> None:
    name, hub = served
    sock = connect(name)
    wait_for(lambda: len(hub.subscribers) == 1)
    sock.close()
    wait_for(lambda: not hub.subscribers)


def test_too_many_readers_are_told(served: tuple[str, EventHub]) -> None:
    name, hub = served
    hub.max_subscribers = 1
    first = connect(name)
    wait_for(lambda: len(hub.subscribers) == 1)
    with pytest.raises(NateditError, match="refused this reader: 1 readers already"):
        next(eventstream.lines(name))
    first.close()


def test_follow_prints_text_filters_and_stops(served: tuple[str, EventHub]) -> None:
    name, hub = served
    out = io.StringIO()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(eventstream.follow(
        name, where=Filter(state="established"), count=2, out=out)), daemon=True)
    thread.start()
    wait_for(lambda: len(hub.subscribers) == 1)
    hub.publish([CallMapped(call(1, "requested")), CallMapped(call(2)),
                 CallRefused(IPv4Address(CLIENT), None, IPv4Address(SERVER), Refusal.TABLE_FULL),
                 CallReleased(call(3), ReleaseReason.IDLE)])
    thread.join(10)
    assert result == [0]
    first, second = out.getvalue().splitlines()
    stamp, _, rest = first.partition(" ")
    assert stamp.endswith("Z") and stamp[4] == "-"
    assert rest == ("event=call_mapped client_address=10.0.0.2 client_call_id=0x1234 "
                    "server_address=198.51.100.2 server_call_id=0x0002 "
                    "public_address=198.51.100.1 public_call_id=0x4002 state=established")
    assert second.endswith(" state=established reason=idle")


def test_follow_ends_when_the_worker_stops(capsys: pytest.CaptureFixture[str]) -> None:
    name, hub = unique_name(), EventHub()
    server = EventServer(name, hub).start()
    out = io.StringIO()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        eventstream.follow(name, json_lines=True, out=out)), daemon=True)
    thread.start()
    wait_for(lambda: len(hub.subscribers) == 1)
    hub.publish([CallMapped(call(7))])
    wait_for(lambda: out.getvalue())
    server.stop()
    thread.join(10)
    assert result == [1]
    entry = json.loads(out.getvalue())
    assert entry["event"] == "call_mapped" and entry["server_call_id"] == 7  # JSON: integers
    assert "closed the event stream" in capsys.readouterr().err


def test_filter() -> None:
    mapped = {"event": "call_mapped", "client_address": CLIENT, "server_address": SERVER,
              "public_address": PUBLIC, "state": "requested"}
    assert Filter().matches(mapped)
    assert Filter(client=CLIENT, server=SERVER, public=PUBLIC, state="requested").matches(mapped)
    assert not Filter(client="10.0.0.3").matches(mapped)
    assert not Filter(state="established").matches(mapped)
    violation = {"event": "protocol_violation", "reason": "bad_cookie"}
    assert not Filter(client=CLIENT).matches(violation)  # no client: not this client's
    assert Filter(client=CLIENT).matches({"event": "events_lost", "count": 3})


def test_file_system_socket_is_private_and_removed(tmp_path: object) -> None:
    path = f"{tmp_path}/events.sock"
    with EventServer(path, EventHub()):
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(NateditError, match="cannot serve events"):
            EventServer(path, EventHub()).start()  # one at a time
    assert not os.path.exists(path)


def test_dispatcher_hands_events_to_the_hub() -> None:
    class Core:
        def handle_packet(self, data: bytes, direction: Direction, now: float) -> Verdict:
            return Verdict(Action.ACCEPT, events=(CallMapped(call(1)),))

        def next_deadline(self) -> float | None:
            return None

        def handle_timer(self, now: float) -> list[object]:
            return []

    class Packet:
        id = 1

        def get_payload(self) -> bytes:
            return b"x"

        def set_payload(self, payload: bytes) -> None: ...
        def accept(self) -> None: ...
        def drop(self) -> None: ...

    dispatcher = Dispatcher(Core())  # type: ignore[arg-type]
    dispatcher.events = hub = EventHub()
    sub = hub.subscribe()
    assert sub is not None
    give(dispatcher.packets, Packet(), Direction.OUTBOUND)
    _, event, lost = sub.queue.get_nowait()
    assert event == CallMapped(call(1)) and lost == 0


def test_events_without_a_worker(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["events", "--socket", unique_name()]) == 1
    assert "natedit: error: no natedit worker serves events at @natedit-test" in (
        capsys.readouterr().err)
