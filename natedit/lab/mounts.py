"""Private mount namespaces: a lab process's own /dev and /run.

pptpd and pptp-linux keep sockets in /run and read /dev/random for Call IDs;
each peer of the lab runs in a mount namespace of its own (inside its network
namespace) that a holder process keeps alive: a tmpfs /run, a small tmpfs
/dev with the usual nodes bound back, a fresh devpts, /dev/log bound to the
lab's :class:`SyslogSink`, and optionally a file (one fixed Call ID) or a
:class:`CallIdFeeder` FIFO (one Call ID per open) over /dev/random. The mounts
die with their holder; the FIFO thread stops in :meth:`Mounts.close`.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .netns import Netns
from .procs import LabError, Processes, which


@dataclass
class PrivateMounts:
    """A private mount namespace (inside a network namespace) kept alive by a holder process.

    It has its own tmpfs on /run (so pptp-linux gets its own call-manager socket), a small
    tmpfs /dev with the usual nodes bound back, a fresh devpts instance, /dev/log bound to
    the lab's syslog sink, and optionally a file or FIFO over /dev/random.
    """

    ns: str
    name: str
    directory: Path
    holder: subprocess.Popen[bytes]
    feeder: CallIdFeeder | None = None
    forced_call_id: int | Sequence[int] | None = None
    calls: int = 0  # pptp invocations started in this mount namespace

    @property
    def pid(self) -> int:
        return self.holder.pid

    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv that runs inside this mount namespace and its network namespace."""
        nsenter = which("nsenter") or "nsenter"
        return [nsenter, "-t", str(self.pid), "-m", "-n", "--", *argv]


class CallIdFeeder:
    """Serves 2-byte little-endian Call IDs through a FIFO bound over /dev/random.

    pptp-linux's call manager opens /dev/random and reads two bytes for every call it
    opens; with a plain file every call would get the same ID. Each open of the FIFO gets
    the next ID (the last one repeats).
    """

    def __init__(self, fifo: Path, call_ids: Sequence[int]) -> None:
        if not call_ids:
            raise ValueError("call_ids must not be empty")
        self.fifo = fifo
        self.call_ids = [c & 0xFFFF for c in call_ids]
        self.served: list[int] = []
        self._stop = threading.Event()
        os.mkfifo(fifo, 0o600)
        self._thread = threading.Thread(target=self._run, name=f"callid-feeder-{fifo}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody has it open for reading yet
                self._stop.wait(0.005)
                continue
            try:
                value = self.call_ids[min(index, len(self.call_ids) - 1)]
                os.write(fd, value.to_bytes(2, sys.byteorder))
                self.served.append(value)
                index += 1
                # Wait for the reader to close, so one open never gets two values.
                poller = select.poll()
                poller.register(fd, 0)
                while not self._stop.is_set():
                    events = poller.poll(10)
                    if events and events[0][1] & (select.POLLERR | select.POLLHUP):
                        break
            finally:
                os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class SyslogSink:
    """Receives syslog datagrams (bound over /dev/log in the lab's mount namespaces)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)
        self._sock.settimeout(0.1)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-syslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            line = data.decode("utf-8", "replace").rstrip("\n\0")
            with self._lock:
                self._lines.append(line)

    def lines(self, contains: str | None = None) -> list[str]:
        with self._lock:
            lines = list(self._lines)
        if contains is not None:
            lines = [line for line in lines if contains in line]
        return lines

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self._sock.close()


# The mount-namespace prelude: run by `unshare --mount --propagation private sh -c`.
# $1 = private dir (gets olddev/, may hold "random"), $2 = syslog socket ("" = none).
_PRELUDE = r"""
set -e
D=$1; LOG=$2; shift 2
mkdir -p "$D/olddev"
mount --rbind /dev "$D/olddev"
mount -t tmpfs -o mode=755,size=1m nedev /dev
for f in null zero full urandom tty; do
  touch "/dev/$f"; mount --bind "$D/olddev/$f" "/dev/$f"
done
touch /dev/random
if [ -e "$D/random" ]; then
  mount --bind "$D/random" /dev/random
else
  mount --bind "$D/olddev/random" /dev/random
fi
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 nedevpts /dev/pts
ln -s pts/ptmx /dev/ptmx
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
if [ -n "$LOG" ]; then touch /dev/log; mount --bind "$LOG" /dev/log; fi
mount -t tmpfs -o mode=755,size=4m nerun /run
umount -l "$D/olddev"
echo ready
exec "$@" </dev/null >/dev/null
"""


class Mounts:
    """The private mount namespaces of one lab (directories below ``directory``)."""

    def __init__(self, directory: Path, procs: Processes, net: Netns, syslog: SyslogSink) -> None:
        self.directory = directory
        self.procs = procs
        self.net = net
        self.syslog = syslog
        self.made: list[PrivateMounts] = []

    def private(
        self,
        ns: str,
        name: str,
        *,
        forced_call_id: int | Sequence[int] | None = None,
    ) -> PrivateMounts:
        """A private mount namespace in ``ns`` (own /run, /dev/log to the lab's syslog).

        ``forced_call_id``: an int binds a 2-byte file over /dev/random, so every read gets
        those bytes (pptp-linux then uses that Call ID for every call); a sequence binds a
        FIFO that serves one value per open (distinct IDs for several calls of one call
        manager).
        """
        directory = self.directory / f"mnt-{name}"
        directory.mkdir()
        feeder: CallIdFeeder | None = None
        if isinstance(forced_call_id, int):
            (directory / "random").write_bytes(call_id_random_bytes(forced_call_id))
        elif forced_call_id is not None:
            feeder = CallIdFeeder(directory / "random", list(forced_call_id))
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _PRELUDE,
            "prelude",
            str(directory),
            str(self.syslog.path),
            "sleep",
            "infinity",
        ]
        holder = self.procs.popen(
            self.net.argv(ns, argv),
            name=f"mnt-{name}",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stop_signal=signal.SIGKILL,
            grace=2.0,
        )
        assert holder.stdout is not None
        line = _readline_with_timeout(holder.stdout, 5.0)
        if line.strip() != b"ready":
            err = b""
            if holder.poll() is not None and holder.stderr is not None:
                err = holder.stderr.read()
            raise LabError(
                f"mount namespace {name} failed: {line!r} {err.decode(errors='replace')}"
            )
        mounts = PrivateMounts(ns, name, directory, holder, feeder, forced_call_id)
        self.made.append(mounts)
        return mounts

    def close(self) -> None:
        """Stop the Call ID feeders (the mounts themselves die with their holders)."""
        for m in self.made:
            if m.feeder is not None:
                m.feeder.stop()


def call_id_random_bytes(call_id: int) -> bytes:
    """The two /dev/random bytes that make pptp-linux 1.10 pick ``call_id``.

    The call manager reads 2 bytes into a u16 in host byte order (little-endian here) and
    uses it when non-zero; zero falls back to ``srand(time(NULL)); rand()``.
    """
    if not 0 < call_id <= 0xFFFF:
        raise ValueError("a forced Call ID must be within 1..65535 (0 means 'use rand()')")
    return call_id.to_bytes(2, sys.byteorder)


def _readline_with_timeout(stream: IO[bytes], timeout: float) -> bytes:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    try:
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            chunk = os.read(fd, 1)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    return buf
