"""The NFQUEUE adapter: queued packets in, the translator's verdicts out.

Theory of operation
-------------------
This is the per-packet path of the user-space datapath. :func:`bound` binds
one NetfilterQueue per queue number, each with the callback that
:meth:`PacketPath.callback` made for its direction; the worker's loop
(:mod:`natedit.worker`) reads the queue sockets when they are readable, at most
:data:`BATCH` packets per queue per turn (:class:`Reader`, through the
library's own loop in C, ``run(block=False)``), and NetfilterQueue calls the
callback once per packet, which must give every packet a verdict and must
never raise, except :class:`TurnOver` once the turn's batch is full (which
ends the library's loop). The worker's verdicts do not go through
NetfilterQueue's ``accept`` (one ``sendmsg`` per packet, which cost as much as
the rest of the worker's work on a packet): they are put into the queue's
:class:`Verdicts`, the same netlink verdict messages one after the other,
written once the turn's reading ends (or every :data:`CHUNK` bytes).

The callback first tries the translator's shortcut for the GRE of live
calls (``gre_out_fast``/``gre_in_fast``: bytes, or None for anything else);
the shortcut counts what it translates, so once it has returned bytes the
packet is never decided again: should putting its verdict into the batch
then raise, the packet is dropped and counted as ``packet_error``. Anything the
shortcut does not take (None, or an exception before it decided) goes
through :meth:`PacketPath.packet`, the full path (``handle_packet``): its
verdict is applied, its events go to the worker, and any exception drops
the packet, is counted as ``packet_error`` and reported.

Packets longer than NetfilterQueue's copy limit (4016 bytes, far above any
PPTP packet at a normal MTU) arrive truncated; the translator sees an IP
total length beyond the bytes and drops them. While no worker is bound, or a
queue is full (:data:`QUEUE_MAXLEN`), the kernel drops (``on_worker_down:
pass`` lets TCP 1723 through while no worker is bound: :mod:`natedit.rules`).

A packet whose verdict carries call events first hands them to ``settle``
(the worker notes a new call's keys for the ownership sets of
:mod:`natedit.owned`), then gets its verdict; the sets are updated once per
batch, by ``Verdicts.before_send``, before the batch goes to the kernel (for
a lone packet on a quiet queue, at once, just before its verdict).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
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
    """What the adapter uses of a ``netfilterqueue.Packet``: its bytes, and the id the
    kernel gave it (what its verdict in a :class:`Verdicts` batch names)."""

    def get_payload(self) -> bytes: ...

    @property
    def id(self) -> int: ...


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
                 on_trouble: Callable[[str, str], None],
                 settle: Callable[[Iterable[Event]], None] | None = None) -> None:
        self.translator = translator
        self.settle = settle
        """Called with a verdict's events before the verdict goes into the batch (the
        ownership sets learn a new call before its first GRE can arrive: the batch's
        ``before_send`` puts them in); must not raise."""
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

    def callback(self, direction: Direction, verdicts: Verdicts) -> Callback:
        """The queue's callback for ``direction``: the GRE of live calls through the
        translator's shortcut, in as few Python steps as possible, everything else
        through :meth:`packet`. Every verdict goes into ``verdicts`` (the worker's
        batch, sent once per turn), and the callback raises :class:`TurnOver` after the
        packet that fills it."""
        fast, slow, clock = self._gre_fast[direction], self.packet, self.clock
        failed, accept = self._failed, verdicts.accept

        def on_packet(packet: Packet) -> None:
            try:
                data, now = packet.get_payload(), clock()
                out = fast(data, now)
            except Exception:
                slow(packet, direction, verdicts)  # not decided yet: the full path decides
            else:
                if out is None:
                    slow(packet, direction, verdicts, data, now)  # (bytes and time read)
                else:
                    try:  # the shortcut counted this packet: it is never decided again
                        accept(packet.id, out)
                    except Exception:
                        failed(packet, direction, verdicts)
            if verdicts.room <= 0:  # the batch is full: the Reader ends the turn
                raise TurnOver

        return on_packet

    def packet(self, packet: Packet, direction: Direction, verdicts: Verdicts,
               data: bytes | None = None, now: float | None = None) -> None:
        """Decide one queued packet (its bytes and the time, if the caller has read them
        already) into ``verdicts``. Never raises: NetfilterQueue's callback must not."""
        decided = False
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
            if verdict.events and self.settle is not None:
                self.settle(verdict.events)
            if verdict.action is Action.ACCEPT:
                verdicts.accept(packet.id, verdict.data)
            else:
                verdicts.drop(packet.id)
            decided = True
            if verdict.events:
                self.on_events(verdict.events)
        except Exception:
            self._failed(packet, direction, verdicts, decided)

    def _failed(self, packet: Packet, direction: Direction, verdicts: Verdicts,
                decided: bool = False) -> None:
        """In an ``except``: drop the packet (if no verdict was given yet), count, report."""
        self.counts["packet_error"] += 1
        if not decided:
            with contextlib.suppress(Exception):
                verdicts.drop(packet.id)
        self.on_trouble("packet_error", f"{direction.name.lower()} packet dropped")


# -- verdicts in batches ----------------------------------------------------------------

NFQNL_MSG_VERDICT = 3 << 8 | 1
"""nlmsg_type of a verdict: NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT."""
NLM_F_REQUEST = 1
NFQA_VERDICT_HDR, NFQA_PAYLOAD = 2, 10
NF_DROP, NF_ACCEPT = 0, 1
_VERDICT_FIELDS = struct.Struct("=HHIIBBHHHI")
"""After nlmsghdr's length: its type, flags, seq, pid; nfgenmsg (family, version, the
queue number big-endian); the NFQA_VERDICT_HDR attribute (length 12, type) and its
big-endian verdict. The packet id (big-endian) follows."""
_BARE = struct.Struct("=I24sI")
"""A verdict that keeps the packet's bytes: length, those fields, the packet id."""
_WITH_PAYLOAD = struct.Struct("=I24sIHH")
"""A verdict with new bytes: the same and the NFQA_PAYLOAD attribute's header."""
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")
"""By length % 4: zeros to the next netlink message (NLMSG_ALIGNTO is 4)."""
CHUNK = 64 * 1024
"""Bytes of verdicts sent in one netlink write (the socket's send buffer is ~208 KiB)."""
IOV_MAX = 1024
"""Pieces one ``sendmsg`` takes; a verdict is at most 3 (head, new bytes, padding)."""


class Verdicts:
    """One queue's verdicts of a loop turn, sent to the kernel in few writes.

    NetfilterQueue's ``accept`` is one ``sendmsg`` per packet, a system call that
    cost as much as everything else the worker does for the packet. These are the
    same NFQNL_MSG_VERDICT netlink messages libnetfilter_queue builds (with the new
    bytes, if any, as NFQA_PAYLOAD), one after the other in one buffer: the kernel
    handles each message of a write in turn (``netlink_rcv_skb``). A packet's verdict
    is sent at the latest when the turn's reading ends (:meth:`Reader.drain`), before
    the loop does anything else; a turn holds at most :data:`BATCH` packets.

    While the queue is quiet (the last turn took at most one packet) each verdict is
    sent at once (:attr:`limit` 0): a lone packet does not wait for the ``recv`` that
    tells the turn is over. A turn that takes more turns the batches back on.

    ``room`` counts down what the turn may still take (at 0 the callback ends the
    turn: :class:`TurnOver`). ``on_trouble(what)`` reports verdicts the
    kernel would not take (each then counted in ``counts['packet_error']``).
    """

    def __init__(self, queue_num: int, counts: Counter[str] | None = None,
                 on_trouble: Callable[[str], None] | None = None) -> None:
        res_id = socket.htons(queue_num)
        self._accept = _VERDICT_FIELDS.pack(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0, 0, 0,
                                            res_id, 12, NFQA_VERDICT_HDR, _ACCEPT_BE)
        self._drop = _VERDICT_FIELDS.pack(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0, 0, 0,
                                          res_id, 12, NFQA_VERDICT_HDR, _DROP_BE)
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.on_trouble = on_trouble
        self.sock: Any = None
        """Where the messages go: the queue's own netlink socket (set by the Reader)."""
        self.parts: list[bytes] = []
        self.size = 0
        """Bytes in :attr:`parts`."""
        self.room = BATCH
        self._counted = BATCH
        """:attr:`room` when verdicts were last counted as sent (:meth:`send`)."""
        self.limit = CHUNK
        """Bytes pending that make it send at once: :data:`CHUNK`, or 0 while the queue
        is quiet (see :meth:`Reader.drain`)."""
        self.before_send: Callable[[], None] = _nothing
        """Called before the verdicts go to the kernel (the worker's ownership sets learn
        the new calls of the batch first: one transaction for the batch)."""
        self.sent = 0
        """Verdicts handed to the kernel so far."""

    def turn(self, room: int) -> None:
        """A new turn, which may take ``room`` verdicts."""
        self.room = self._counted = room

    def accept(self, packet_id: int, payload: bytes | None = None) -> None:
        """Accept the packet, with ``payload`` as its new bytes (None: as it came)."""
        if payload is None:
            self.parts.append(_BARE.pack(32, self._accept, _htonl(packet_id)))
            self.size += 32
        else:
            n = len(payload)
            self.parts += (_WITH_PAYLOAD.pack(36 + n, self._accept, _htonl(packet_id), 4 + n,
                                              NFQA_PAYLOAD), payload, _PADS[n & 3])
            self.size += 36 + n
        self.room -= 1
        if self.size >= self.limit:
            self.send()

    def drop(self, packet_id: int) -> None:
        self.parts.append(_BARE.pack(32, self._drop, _htonl(packet_id)))
        self.size += 32
        self.room -= 1
        if self.size >= self.limit:
            self.send()

    def send(self) -> None:
        """Hand the kernel every verdict not sent yet. Never raises: a write the kernel
        refuses is tried again message by message; a message still refused is counted
        (``packet_error``) and reported: that packet stays queued until the worker
        unbinds, and the kernel then drops it."""
        if not self.parts:
            return
        self.before_send()
        parts, pending = self.parts, self._counted - self.room
        self.parts, self.size, self._counted = [], 0, self.room
        try:
            self.sock.sendmsg(parts)  # gathered by the kernel: no copy into one buffer
        except OSError:
            self._one_by_one(b"".join(parts))
            return
        self.sent += pending

    def _one_by_one(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            (length,) = _U32.unpack_from(data, at)
            end = at + length + _PAD[length & 3]
            try:
                self.sock.send(data[at:end])
                self.sent += 1
            except OSError as exc:
                self.counts["packet_error"] += 1
                if self.on_trouble is not None:
                    self.on_trouble(f"verdict not taken by the kernel ({exc})")
            at = end


_htonl = socket.htonl
_ACCEPT_BE, _DROP_BE = _htonl(NF_ACCEPT), _htonl(NF_DROP)
_U32 = struct.Struct("=I")
_PAD = (0, 3, 2, 1)


def _nothing() -> None:
    return None


BATCH = 256
"""Most packets one queue hands the callback per turn of the worker's loop. The
library's own ``run(block=False)`` returns only once the socket is empty, which under
a steady flood is never: timers, the event flush, the state journal, signals and the
other queue then wait for good. 256 packets are ~0.3 ms of work here; the queue holds
:data:`QUEUE_MAXLEN`."""


class TurnOver(BaseException):
    """Raised by a batched callback after the packet that fills the turn's batch: it
    ends NetfilterQueue's ``run`` (an exception in a callback stops the library's
    loop and comes out of ``run``), and :meth:`Reader.drain` takes it. Not an
    ``Exception``, so that no handler on the per-packet path mistakes it for
    trouble."""


class Reader:
    """Reads one bound queue at most :data:`BATCH` packets a turn, through the library's
    own loop in C (``run(block=False)``: ``recv`` into a buffer of its own until the
    socket is empty, no Python step per packet but the callback), which the callback
    stops with :class:`TurnOver` once ``verdicts`` (the :class:`Verdicts` it fills) has
    taken ``batch`` packets. The turn's verdicts are sent before :meth:`drain` returns."""

    def __init__(self, queue: Any, verdicts: Verdicts, batch: int = BATCH) -> None:
        if batch * 3 > IOV_MAX:
            raise ValueError(f"a batch of {batch} verdicts may not fit one sendmsg")
        self.queue = queue
        self.batch = batch
        self._sock = socket.socket(fileno=os.dup(queue.get_fd()))
        self._sock.setblocking(False)
        self.verdicts = verdicts
        verdicts.sock = self._sock
        self.full_turns = 0
        """Turns that ended on the bound with packets perhaps still waiting."""

    def drain(self) -> None:
        """Hand the callback what is waiting, at most ``batch`` packets, and send their
        verdicts."""
        verdicts = self.verdicts
        verdicts.turn(self.batch)
        try:
            self.queue.run(False)
        except TurnOver:
            self.full_turns += 1
        finally:
            verdicts.send()
            # quiet (at most one packet this turn): the next turn's verdicts go at once
            verdicts.limit = 0 if verdicts.room >= self.batch - 1 else CHUNK

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
