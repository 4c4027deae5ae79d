"""``natedit events``: the running worker's call events, live, like ``conntrack -E``.

Theory of operation
-------------------
The worker's loop hands every batch of events it logs to :meth:`EventHub.publish`,
which puts each event, with the wall-clock time, on one bounded queue per
subscriber (:data:`QUEUE_SIZE`) and never waits: a full queue loses that
event for that subscriber, counted (``natedit_events_lost_total``) and told
in its stream (an ``events_lost`` line where the gap is). With nobody
subscribed, publishing is one attribute read. Nothing here is on the path of
a packet that makes no event (GRE of live calls, most TCP segments), and no
formatting or I/O happens on the loop.

:class:`EventServer` listens on a unix stream socket, by default in the
abstract namespace (:data:`DEFAULT_SOCKET`, ``@natedit/events``), which,
like the metrics port, belongs to the network namespace: ``natedit events``
run where ``natedit calls`` finds the worker finds this stream too. It takes
root and the worker's own user only (``SO_PEERCRED``), at most
:data:`MAX_SUBSCRIBERS` at once. Each subscriber has a thread of its own
that takes from its queue and writes one JSON object per line
(:func:`natedit.logs.event_fields` and ``time``); a subscriber that takes
nothing for :data:`SEND_TIMEOUT` seconds is disconnected. The server does
not depend on the metrics HTTP server.

:func:`follow` is the client side: it reads the lines, filters them and
prints text (``time event=... client_address=...``, Call IDs in hex) or the
JSON as it came.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import Event, NateditError
from .logs import event_fields, format_fields, timestamp

log = logging.getLogger("natedit")

DEFAULT_SOCKET = "@natedit/events"
"""Where the worker serves its events: ``@name`` is the abstract namespace (per network
namespace, like the metrics port), anything else a file system path."""
QUEUE_SIZE = 4096
"""Events waiting per subscriber; beyond, that subscriber loses events (counted)."""
MAX_SUBSCRIBERS = 16
SEND_TIMEOUT = 10.0
"""Seconds a subscriber may take nothing before it is disconnected."""
IDLE_CHECK = 0.5
"""Seconds between two looks, when no event comes, at whether a subscriber left."""
LOST = "events_lost"
"""The ``event`` of the line that tells a subscriber how many events it lost."""


def address(name: str) -> str | bytes:
    """A socket address from ``@abstract`` or a path."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


# -- the worker side ----------------------------------------------------------------------


class Subscriber:
    """One reader: its queue and what it lost. ``lost`` only grows (the loop's thread)."""

    def __init__(self, size: int) -> None:
        self.queue: queue.Queue[tuple[float, Event, int]] = queue.Queue(size)
        self.lost = 0


class EventHub:
    """Fans the worker's events out to subscribers; never blocks the loop."""

    def __init__(self, queue_size: int = QUEUE_SIZE, max_subscribers: int = MAX_SUBSCRIBERS,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.clock = clock
        self.subscribers: tuple[Subscriber, ...] = ()
        """Replaced, never changed in place: the loop iterates it without a lock."""
        self.lost_total = 0
        self._lock = threading.Lock()

    def publish(self, events: Iterable[Event]) -> None:
        """From the worker's loop: each event onto every subscriber's queue, or counted lost."""
        subscribers = self.subscribers
        if not subscribers:
            return
        now = self.clock()
        for event in events:
            for sub in subscribers:
                try:
                    sub.queue.put_nowait((now, event, sub.lost))
                except queue.Full:
                    sub.lost += 1
                    self.lost_total += 1

    def subscribe(self) -> Subscriber | None:
        """A new subscriber; None when :attr:`max_subscribers` are there already."""
        with self._lock:
            if len(self.subscribers) >= self.max_subscribers:
                return None
            sub = Subscriber(self.queue_size)
            self.subscribers = (*self.subscribers, sub)
            return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self.subscribers = tuple(s for s in self.subscribers if s is not sub)

    def collect(self) -> Iterator[Metric]:
        """Its metric families (the worker's collector yields them)."""
        yield GaugeMetricFamily("natedit_event_subscribers",
                                "Readers of the live event stream (natedit events).",
                                value=len(self.subscribers))
        yield CounterMetricFamily("natedit_events_lost",
                                  "Events a slow reader of the event stream did not get.",
                                  value=self.lost_total)


def encode(when: float, fields: Mapping[str, Any]) -> bytes:
    """One line of the stream: the event's fields and its time, as JSON."""
    return (json.dumps({"time": timestamp(when), **fields}) + "\n").encode()


class EventServer:
    """The unix socket and one writer thread per subscriber. A context manager."""

    def __init__(self, name: str, hub: EventHub) -> None:
        self.name = name
        self.hub = hub
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()

    def start(self) -> EventServer:
        where = address(self.name)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if isinstance(where, str):
                _remove_stale(where)
            listener.bind(where)
            if isinstance(where, str):
                os.chmod(where, 0o600)
            listener.listen(8)
        except OSError as exc:
            listener.close()
            raise NateditError(f"cannot serve events on {self.name} ({exc.strerror or exc}): "
                               "is another natedit running?") from exc
        self._listener = listener
        self._spawn(self._accept, "natedit-events")
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        where = address(self.name)
        if isinstance(where, str):
            with contextlib.suppress(OSError):
                os.unlink(where)

    def __enter__(self) -> EventServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            if not _allowed(conn):
                _refuse(conn, "only root and natedit's own user may read the event stream")
                continue
            sub = self.hub.subscribe()
            if sub is None:
                _refuse(conn, f"{self.hub.max_subscribers} readers already")
                continue
            self._conns.add(conn)
            self._spawn(self._serve, "natedit-events-reader", conn, sub)

    def _serve(self, conn: socket.socket, sub: Subscriber) -> None:
        told = 0
        try:
            conn.settimeout(SEND_TIMEOUT)
            while not self._stopping.is_set():
                try:
                    when, event, lost = sub.queue.get(timeout=IDLE_CHECK)
                except queue.Empty:
                    if _left(conn):
                        return
                    when, lost, event = self.hub.clock(), sub.lost, None  # a gap at the end
                out = b""
                if lost > told:
                    out += encode(when, {"event": LOST, "count": lost - told})
                    told = lost
                if event is not None:
                    out += encode(when, event_fields(event))
                if out:
                    conn.sendall(out)
        except OSError:
            pass  # gone, or took nothing for SEND_TIMEOUT
        finally:
            self.hub.unsubscribe(sub)
            self._conns.discard(conn)
            conn.close()


def _remove_stale(path: str) -> None:
    """Unlink a socket file no process listens on (a crashed worker's)."""
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise OSError(f"{path} is in use")


def _allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def _refuse(conn: socket.socket, why: str) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(1.0)
        conn.sendall(encode(time.time(), {"event": "refused", "reason": why}))
    conn.close()


def _left(conn: socket.socket) -> bool:
    """The reader closed its end (or sent something: readers send nothing)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


# -- the reader side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """``natedit events`` / ``natedit calls`` filters: None matches anything."""

    client: str | None = None
    server: str | None = None
    public: str | None = None
    state: str | None = None

    def matches(self, fields: Mapping[str, Any]) -> bool:
        """A call or an event passes when it has each field a filter is given for, with
        that value; ``events_lost`` lines always pass (a reader must know of a gap)."""
        if fields.get("event") == LOST:
            return True
        for key, want in (("client_address", self.client), ("server_address", self.server),
                          ("public_address", self.public), ("state", self.state)):
            if want is not None and str(fields.get(key)) != want:
                return False
        return True


def lines(name: str, timeout: float = 5.0) -> Iterator[dict[str, Any]]:
    """The worker's event stream, one dict per line, until the worker closes it.

    NateditError when no worker serves events at ``name`` or it refuses this reader.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(address(name))
    except OSError as exc:
        sock.close()
        raise NateditError(f"no natedit worker serves events at {name} "
                           f"({exc.strerror or exc})") from exc
    sock.settimeout(None)
    with sock, sock.makefile("rb") as stream:
        for raw in stream:
            entry: dict[str, Any] = json.loads(raw)
            if entry.get("event") == "refused":
                raise NateditError(f"the worker at {name} refused this reader: "
                                   f"{entry.get('reason')}")
            yield entry


def text_line(entry: Mapping[str, Any]) -> str:
    """``2026-12-02T19:10:01.123Z event=call_mapped client_address=...``."""
    fields = {k: v for k, v in entry.items() if k != "time"}
    return f"{entry.get('time', '-')} {format_fields(fields)}"


def follow(name: str, *, json_lines: bool = False, where: Filter = Filter(),
           count: int | None = None, out: TextIO | None = None) -> int:
    """Print the stream (``natedit events``) until the worker stops, ``count`` events
    have been printed, or Ctrl-C. 0 on Ctrl-C or after ``count``; 1 when the worker
    closed the stream. ``out``: stdout."""
    out = sys.stdout if out is None else out
    printed = 0
    try:
        for entry in lines(name):
            if not where.matches(entry):
                continue
            out.write((json.dumps(entry) if json_lines else text_line(entry)) + "\n")
            out.flush()
            if entry.get("event") != LOST:
                printed += 1
                if count is not None and printed >= count:
                    return 0
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # natedit events | head
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python's advice for EPIPE
        return 0
    print("natedit: the worker closed the event stream (stopped)", file=sys.stderr)
    return 1
