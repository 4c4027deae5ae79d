"""Frame pump: send unique HDLC-framed PPP frames per call, read echoes back, classify them.

Every data frame carries ``MAGIC + run tag + key (u16) + seq (u32) + filler``; the filler
is derived from (key, seq) and deliberately contains flag, escape and control bytes. A frame
that comes back on call K is *own* if it carries key K (and is byte-identical to what K
sent), *foreign* if it carries another key of this run, *other* for anything else (such
as the server stand-in's hello frame, which is recorded separately).
"""

from __future__ import annotations

import contextlib
import secrets
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .hdlc import PPP_PROTO_HARNESS, HdlcDeframer, hdlc_encode, ppp_frame
from .peers import StandinInfo, parse_standin_hello

MAGIC = b"NEH1"
_HEADER = struct.Struct("!4s4sHI")  # magic, run tag, key, seq


def payload_for(tag: bytes, key: int, seq: int) -> bytes:
    filler_len = 8 + (key * 7 + seq * 13) % 56
    filler = bytes((key * 31 + seq * 17 + i * 29) & 0xFF for i in range(filler_len))
    return _HEADER.pack(MAGIC, tag, key, seq) + filler


@dataclass
class PumpStats:
    """What one call sent and got back."""

    key: int
    sent: int = 0
    sent_seqs: set[int] = field(default_factory=set)
    returned: set[int] = field(default_factory=set)  # own seqs that came back intact
    duplicates: int = 0
    corrupt: int = 0  # own key and seq, but bytes differ from what was sent
    foreign: int = 0  # frames of another call of this run
    foreign_from: Counter[int] = field(default_factory=Counter)
    other: int = 0  # frames that are neither ours nor a stand-in hello
    bad_fcs: int = 0
    hellos: list[StandinInfo] = field(default_factory=list)
    eof: bool = False  # pptp closed its end
    send_errors: int = 0

    @property
    def received(self) -> int:
        return len(self.returned)

    @property
    def missing(self) -> set[int]:
        return self.sent_seqs - self.returned

    @property
    def hello(self) -> StandinInfo | None:
        return self.hellos[0] if self.hellos else None

    def summary(self) -> str:
        return (
            f"key={self.key} sent={self.sent} received={self.received} foreign={self.foreign}"
            f"{dict(self.foreign_from) if self.foreign else ''} dup={self.duplicates}"
            f" corrupt={self.corrupt} other={self.other} bad_fcs={self.bad_fcs}"
            f" hello={'yes' if self.hellos else 'no'} eof={self.eof}"
        )


class FramePump:
    """Drives any number of calls' PPP descriptors from one thread (selectors, no sleeps)."""

    def __init__(self, tag: bytes | None = None) -> None:
        self.tag = tag if tag is not None else secrets.token_bytes(4)
        if len(self.tag) != 4:
            raise ValueError("tag must be 4 bytes")
        self._sel = selectors.DefaultSelector()
        self._socks: dict[int, socket.socket] = {}
        self._deframers: dict[int, HdlcDeframer] = {}
        self.stats: dict[int, PumpStats] = {}
        self._next_seq: dict[int, int] = {}

    def add(self, key: int, sock: socket.socket) -> None:
        if key in self._socks:
            raise ValueError(f"key {key} already added")
        if not 0 <= key <= 0xFFFF:
            raise ValueError("key must fit in 16 bits")
        sock.setblocking(False)
        self._socks[key] = sock
        self._deframers[key] = HdlcDeframer()
        self.stats[key] = PumpStats(key)
        self._next_seq[key] = 0
        self._sel.register(sock, selectors.EVENT_READ, key)

    def close(self) -> None:
        self._sel.close()

    # -------------------------------------------------------------- sending

    def send_frame(self, key: int) -> int | None:
        """Send the next frame of call ``key``; returns its seq (None if the call is gone)."""
        st = self.stats[key]
        if st.eof:
            return None
        seq = self._next_seq[key]
        self._next_seq[key] = seq + 1
        data = hdlc_encode(ppp_frame(PPP_PROTO_HARNESS, payload_for(self.tag, key, seq)))
        sock = self._socks[key]
        deadline = time.monotonic() + 1.0
        view = memoryview(data)
        while view:
            try:
                n = sock.send(view)
                view = view[n:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    st.send_errors += 1
                    return None
                self.poll(0.005)
            except OSError:
                st.send_errors += 1
                st.eof = True
                return None
        st.sent += 1
        st.sent_seqs.add(seq)
        return seq

    def send_round(
        self, keys: Iterable[int], count: int, gap: float = 0.003
    ) -> dict[int, list[int]]:
        """Interleave ``count`` frames per call, reading echoes in between.

        Returns the seqs sent per key (so a phase can be checked on its own).
        """
        keys = list(keys)
        sent: dict[int, list[int]] = {k: [] for k in keys}
        for _ in range(count):
            for key in keys:
                seq = self.send_frame(key)
                if seq is not None:
                    sent[key].append(seq)
            self.poll(gap)
        return sent

    # -------------------------------------------------------------- receiving

    def poll(self, timeout: float = 0.0) -> None:
        """Read everything available (waiting at most ``timeout`` for the first event)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            events = self._sel.select(remaining)
            if not events:
                return
            for selkey, _ in events:
                self._read(selkey.data)
            if time.monotonic() >= deadline:
                # drain whatever else is immediately ready, then stop
                events = self._sel.select(0)
                for selkey, _ in events:
                    self._read(selkey.data)
                return

    def _read(self, key: int) -> None:
        sock = self._socks[key]
        st = self.stats[key]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            st.eof = True
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            return
        deframer = self._deframers[key]
        for frame in deframer.feed(data):
            self._classify(key, frame)
        st.bad_fcs = deframer.bad_fcs

    def _classify(self, key: int, frame: bytes) -> None:
        st = self.stats[key]
        idx = frame.find(MAGIC)
        if idx >= 0 and len(frame) >= idx + _HEADER.size:
            _, tag, fkey, seq = _HEADER.unpack_from(frame, idx)
            if tag == self.tag:
                if fkey != key:
                    st.foreign += 1
                    st.foreign_from[fkey] += 1
                    return
                if frame[idx:] != payload_for(self.tag, key, seq) or seq not in st.sent_seqs:
                    st.corrupt += 1
                elif seq in st.returned:
                    st.duplicates += 1
                else:
                    st.returned.add(seq)
                return
        hello = parse_standin_hello(frame)
        if hello is not None:
            st.hellos.append(hello)
            return
        st.other += 1

    # -------------------------------------------------------------- waiting

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.poll(min(remaining, 0.02))
        return True

    def wait_hello(self, keys: Iterable[int], timeout: float) -> bool:
        """Wait until the server stand-in's hello frame reached each call (call is up)."""
        keys = list(keys)
        return self.wait_until(lambda: all(self.stats[k].hellos for k in keys), timeout)

    def wait_returned(self, keys: Iterable[int], timeout: float) -> bool:
        """Wait until every frame sent on each call came back (or the call hit EOF)."""
        keys = list(keys)
        return self.wait_until(
            lambda: all(self.stats[k].eof or not self.stats[k].missing for k in keys), timeout
        )

    def linger(self, duration: float) -> None:
        """Keep reading for ``duration`` (late or foreign frames)."""
        self.poll(duration)
