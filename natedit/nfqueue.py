"""The NFQUEUE adapter: queued packets in, the translator's verdicts out.

Theory of operation
-------------------
This is the per-packet path of the user-space datapath. :func:`bound` binds
one NetfilterQueue per queue number, each with the callback that
:meth:`PacketPath.callback` made for its direction; the worker's loop
(:mod:`natedit.worker`) reads the queue sockets when they are readable, at most
:data:`BATCH` packets per queue per turn (:class:`Reader`), and
NetfilterQueue calls the callback once per packet, which must give every
packet a verdict and must never raise.

The callback first tries the translator's shortcut for the GRE of live
calls (``gre_out_fast``/``gre_in_fast``: bytes, or None for anything else);
the shortcut counts what it translates, so once it has returned bytes the
packet is never decided again: should ``set_payload`` or ``accept`` then
raise, the packet is dropped and counted as ``packet_error``. Anything the
shortcut does not take (None, or an exception before it decided) goes
through :meth:`PacketPath.packet`, the full path (``handle_packet``): its
verdict is applied, its events go to the worker, and any exception drops
the packet, is counted as ``packet_error`` and reported.

Packets longer than NetfilterQueue's copy limit (4016 bytes, far above any
PPTP packet at a normal MTU) arrive truncated; the translator sees an IP
total length beyond the bytes and drops them. While no worker is bound, or a
queue is full (:data:`QUEUE_MAXLEN`), the kernel drops (no queue bypass).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from . import Action, Direction, Event, Verdict, host, wire

log = logging.getLogger("natedit")

QUEUE_MAXLEN = 4096
"""Packets the kernel holds per queue while the worker is busy; beyond, it drops them."""
COPY_RANGE = 0xFFFF
"""Bytes of each packet to copy to user space (NetfilterQueue 1.1 caps it at 4016)."""
SOCKET_BUFFER = QUEUE_MAXLEN * 4800 // 2
"""Netlink receive buffer for a full queue of copies (the kernel doubles it)."""


class Packet(Protocol):
    """What the adapter uses of a ``netfilterqueue.Packet``."""

    def get_payload(self) -> bytes: ...
    def set_payload(self, payload: bytes) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...


class Decider(Protocol):
    """What the adapter uses of :class:`natedit.core.translator.Translator` (and, when it
    has them, its ``gre_out_fast``/``gre_in_fast`` shortcuts)."""

    def handle_packet(self, data: bytes, direction: Direction, now: float) -> Verdict: ...


class NatDecider(Protocol):
    """A :class:`Decider` that takes the NAT address of a control connection too."""

    def handle_packet(self, data: bytes, direction: Direction, now: float,
                      public: bytes | None = None) -> Verdict: ...


NatLookup = Callable[[bytes, Direction, float], "bytes | None"]
"""A packet's bytes, direction and time -> the address its control connection is
NATed to (:class:`natedit.conntrack.NatAddresses`), or None."""

Callback = Callable[[Packet], None]


class PacketPath:
    """Applies the translator's verdicts to queued packets.

    ``counts`` gets ``packet_error``; ``on_events`` the events of each verdict;
    ``on_trouble(kind, what)`` is called, inside the ``except``, for each packet
    dropped on an exception (the worker logs it, throttled).
    """

    def __init__(self, translator: Decider, clock: Callable[[], float],
                 counts: Counter[str], on_events: Callable[[Iterable[Event]], None],
                 on_trouble: Callable[[str, str], None]) -> None:
        self.translator = translator
        self.clock = clock
        self.counts = counts
        self.on_events = on_events
        self.on_trouble = on_trouble
        self._gre_fast = (getattr(translator, "gre_out_fast", _not_fast),
                          getattr(translator, "gre_in_fast", _not_fast))
        """By Direction: the translator's shortcut for the GRE of live calls (bytes, or
        None for anything else), tried before ``handle_packet``."""
        self._nat: tuple[NatLookup, NatDecider] | None = None

    def read_nat(self, lookup: NatLookup, translator: NatDecider) -> None:
        """From now on, give ``translator`` (this path's) each TCP 1723 segment's NAT
        address as ``lookup`` finds it (several public addresses)."""
        self._nat = (lookup, translator)

    def callback(self, direction: Direction) -> Callback:
        """The queue's callback for ``direction``: the GRE of live calls through the
        translator's shortcut, in as few Python steps as possible, everything else
        through :meth:`packet`."""
        fast, slow, clock = self._gre_fast[direction], self.packet, self.clock
        failed = self._failed

        def on_packet(packet: Packet) -> None:
            try:
                data, now = packet.get_payload(), clock()
                out = fast(data, now)
            except Exception:
                slow(packet, direction)  # not decided yet: the full path decides, counts
                return
            if out is None:
                slow(packet, direction, data, now)  # the bytes and the time already read
                return
            try:  # the shortcut counted this packet: it is never decided again
                packet.set_payload(out)
                packet.accept()
            except Exception:
                failed(packet, direction)

        return on_packet

    def packet(self, packet: Packet, direction: Direction, data: bytes | None = None,
               now: float | None = None) -> None:
        """Decide one queued packet (its bytes and the time, if the caller has read them
        already). Never raises: NetfilterQueue's callback must not."""
        try:
            if data is None:
                data = packet.get_payload()
            if now is None:
                now = self.clock()
            nat = self._nat
            if nat is None or len(data) < 20 or data[9] != wire.IPPROTO_TCP:
                verdict = self.translator.handle_packet(data, direction, now)
            else:
                verdict = nat[1].handle_packet(data, direction, now, nat[0](data, direction, now))
            if verdict.action is Action.ACCEPT:
                if verdict.data is not None:
                    packet.set_payload(verdict.data)
                packet.accept()
            else:
                packet.drop()
            if verdict.events:
                self.on_events(verdict.events)
        except Exception:
            self._failed(packet, direction)

    def _failed(self, packet: Packet, direction: Direction) -> None:
        """In an ``except``: drop the packet (if no verdict was given yet), count, report."""
        self.counts["packet_error"] += 1
        with contextlib.suppress(Exception):  # the verdict may already be given
            packet.drop()
        self.on_trouble("packet_error", f"{direction.name.lower()} packet dropped")


BATCH = 256
"""Most packets one queue hands the callback per turn of the worker's loop. The
library's own ``run(block=False)`` returns only once the socket is empty, which under
a steady flood is never: timers, the event flush, the state journal, signals and the
other queue then wait for good. 256 packets are ~0.3 ms of work here; the queue holds
:data:`QUEUE_MAXLEN`."""


class Reader:
    """Reads one bound queue at most :data:`BATCH` packets at a time, through the
    library's ``run_socket`` (its loop stops when ``recv`` says EAGAIN; this socket
    says it once the batch is done)."""

    def __init__(self, queue: Any, batch: int = BATCH) -> None:
        self.queue = queue
        self.batch = batch
        self._sock = socket.socket(fileno=os.dup(queue.get_fd()))
        self._sock.setblocking(False)
        self._recv = self._sock.recv
        self._left = 0
        self.full_turns = 0
        """Turns that ended on the bound with packets perhaps still waiting."""

    def recv(self, size: int) -> bytes:
        if self._left <= 0:
            self.full_turns += 1
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self._left -= 1
        return self._recv(size)

    def drain(self) -> None:
        """Hand the callback what is waiting, at most ``batch`` packets."""
        self._left = self.batch
        self.queue.run_socket(self)

    def close(self) -> None:
        self._sock.close()


def _not_fast(data: bytes, now: float) -> None:
    """A translator without a GRE shortcut: every packet goes to handle_packet."""
    return None


@contextlib.contextmanager
def bound(callbacks: Mapping[int, Callback]) -> Iterator[list[Any]]:
    """A bound NetfilterQueue per queue number, with its callback; unbound on exit.

    Raises :class:`natedit.host.HostError` when a queue cannot be bound.
    """
    from netfilterqueue import COPY_PACKET, NetfilterQueue

    queues: list[Any] = []
    try:
        for number, callback in callbacks.items():
            queue = NetfilterQueue()
            queues.append(queue)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    queue.bind(number, callback, QUEUE_MAXLEN, COPY_PACKET, COPY_RANGE,
                               SOCKET_BUFFER)  # fmt: skip
                except OSError as exc:
                    raise host.HostError(
                        f"cannot bind NFQUEUE {number} ({exc}): is another natedit running?"
                    ) from exc
            for warning in caught:
                log.warning("queue %d: %s", number, warning.message)
        yield queues
    finally:
        for queue in queues:
            queue.unbind()
