"""Network-namespace lab: N clients behind a gateway, one server, full cleanup.

Topology (all names carry a per-run prefix, nothing is created in the host namespace)::

    <p>-c1 eth0 10.0.0.11 -+
    <p>-c2 eth0 10.0.0.12 -+- <p>-gw br0 10.0.0.1/24
    ...                   -+        out0 198.51.100.1/24 --- <p>-srv eth0 198.51.100.2/24
                                    (ip_forward=1, default via 198.51.100.2)

Every veth end and the bridge have TX offload off. Everything the lab creates -
namespaces, processes (recorded ones, then every process still living in one of its
namespaces, each killed by PID), private mount namespaces (they die with their holder
process) and the temp dir - is removed on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

PUBLIC_GW_ADDR = "198.51.100.1"
SERVER_ADDR = "198.51.100.2"
PUBLIC_PREFIXLEN = 24
INSIDE_GW_ADDR = "10.0.0.1"
INSIDE_PREFIXLEN = 24
FIRST_CLIENT_HOST = 11

GW_INSIDE_IF = "br0"
GW_OUTSIDE_IF = "out0"
NS_IF = "eth0"

PPTP_PORT = 1723

REQUIRED_COMMANDS = (
    "ip",
    "iptables",
    "ethtool",
    "unshare",
    "nsenter",
    "mount",
    "sysctl",
    "pptpd",
    "pptpctrl",
    "pptp",
    "cat",
)
"""What the lab itself runs (the tests add their capture tools)."""
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def which(cmd: str) -> str | None:
    """shutil.which that also looks in the sbin directories (pytest may run without them)."""
    found = shutil.which(cmd)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / cmd
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def prerequisite_problems(extra_commands: Sequence[str] = ()) -> list[str]:
    """What is missing for the lab on this machine (empty list: all good)."""
    problems: list[str] = []
    if sys.platform != "linux":
        return [f"needs Linux, running on {sys.platform}"]
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, iptables, mounts)")
    problems.extend(f"command not found: {cmd}"
                    for cmd in (*REQUIRED_COMMANDS, *extra_commands) if not which(cmd))
    if not Path("/proc/self/ns/net").exists() or not Path("/proc/self/ns/mnt").exists():
        problems.append("kernel without network/mount namespace support")
    return problems


class LabError(RuntimeError):
    """A lab step failed (command error, timeout waiting for readiness, ...)."""


@dataclass(frozen=True)
class ClientNode:
    index: int  # 0-based
    ns: str
    addr: str
    ifname: str
    bridge_port: str  # the veth end in the gateway namespace


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


@dataclass
class _Proc:
    proc: subprocess.Popen[bytes]
    name: str
    ns: str | None
    log: Path | None
    stop_signal: int = signal.SIGTERM
    grace: float = 2.0


@dataclass
class Lab:
    """The namespace lab. Use as a context manager: ``with Lab(3) as lab: ...``."""

    n_clients: int
    prefix: str | None = None
    keep_tmp: bool = False
    gw_ns: str = field(init=False)
    server_ns: str = field(init=False)
    clients: list[ClientNode] = field(init=False, default_factory=list)
    tmpdir: Path = field(init=False)
    syslog: SyslogSink = field(init=False)
    created_ns: list[str] = field(init=False, default_factory=list)
    _procs: list[_Proc] = field(init=False, default_factory=list)
    _mounts: list[PrivateMounts] = field(init=False, default_factory=list)
    _ns_inodes: dict[str, tuple[int, int]] = field(init=False, default_factory=dict)
    _torn_down: bool = field(init=False, default=False)
    _serial: int = field(init=False, default=0)
    gateway_processes: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.n_clients < 1 or self.n_clients > 200:
            raise ValueError("n_clients must be within 1..200")
        if self.prefix is None:
            self.prefix = f"ne{os.getpid() % 100000:05d}{secrets.token_hex(2)}"
        self.gw_ns = f"{self.prefix}-gw"
        self.server_ns = f"{self.prefix}-srv"
        for i in range(self.n_clients):
            self.clients.append(
                ClientNode(
                    index=i,
                    ns=f"{self.prefix}-c{i + 1}",
                    addr=f"10.0.0.{FIRST_CLIENT_HOST + i}",
                    ifname=NS_IF,
                    bridge_port=f"p{i + 1}",
                )
            )

    def serial(self) -> int:
        """A counter for unique names within this lab."""
        self._serial += 1
        return self._serial

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        os.chmod(self.tmpdir, 0o755)
        try:
            self.syslog = SyslogSink(self.tmpdir / "log")
            self._build()
        except BaseException:
            with contextlib.suppress(LabError):
                self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.teardown()
            return
        try:  # do not mask the exception that is already on its way
            self.teardown()
        except LabError as teardown_error:
            warnings.warn(str(teardown_error), RuntimeWarning, stacklevel=2)

    @property
    def gw_outside_if(self) -> str:
        return GW_OUTSIDE_IF

    @property
    def gw_inside_if(self) -> str:
        return GW_INSIDE_IF

    @property
    def server_addr(self) -> str:
        return SERVER_ADDR

    @property
    def gw_public_addr(self) -> str:
        return PUBLIC_GW_ADDR

    @property
    def namespaces(self) -> list[str]:
        return [self.gw_ns, self.server_ns, *(c.ns for c in self.clients)]

    def _add_ns(self, name: str) -> None:
        self._run(["ip", "netns", "add", name])
        self.created_ns.append(name)
        st = os.stat(f"/run/netns/{name}")
        self._ns_inodes[name] = (st.st_dev, st.st_ino)
        self._run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        for ns in self.namespaces:
            self._add_ns(ns)
        gw, srv = self.gw_ns, self.server_ns
        ip_gw = ["ip", "-n", gw]
        self._run([*ip_gw, "link", "add", GW_INSIDE_IF, "type", "bridge"])
        self._run(
            [*ip_gw, "addr", "add", f"{INSIDE_GW_ADDR}/{INSIDE_PREFIXLEN}", "dev", GW_INSIDE_IF]
        )
        self._run([*ip_gw, "link", "set", GW_INSIDE_IF, "up"])
        self._run(
            [
                *ip_gw,
                "link",
                "add",
                GW_OUTSIDE_IF,
                "type",
                "veth",
                "peer",
                "name",
                NS_IF,
                "netns",
                srv,
            ]
        )
        self._run(
            [*ip_gw, "addr", "add", f"{PUBLIC_GW_ADDR}/{PUBLIC_PREFIXLEN}", "dev", GW_OUTSIDE_IF]
        )
        self._run([*ip_gw, "link", "set", GW_OUTSIDE_IF, "up"])
        self._run(
            ["ip", "-n", srv, "addr", "add", f"{SERVER_ADDR}/{PUBLIC_PREFIXLEN}", "dev", NS_IF]
        )
        self._run(["ip", "-n", srv, "link", "set", NS_IF, "up"])
        self._run([*ip_gw, "route", "add", "default", "via", SERVER_ADDR])
        for c in self.clients:
            self._run(
                [
                    *ip_gw,
                    "link",
                    "add",
                    c.bridge_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    c.ifname,
                    "netns",
                    c.ns,
                ]
            )
            self._run([*ip_gw, "link", "set", c.bridge_port, "master", GW_INSIDE_IF, "up"])
            self._run(
                ["ip", "-n", c.ns, "addr", "add", f"{c.addr}/{INSIDE_PREFIXLEN}", "dev", c.ifname]
            )
            self._run(["ip", "-n", c.ns, "link", "set", c.ifname, "up"])
            self._run(["ip", "-n", c.ns, "route", "add", "default", "via", INSIDE_GW_ADDR])
        self.sysctl(gw, "net.ipv4.ip_forward", "1")
        # TX offload off everywhere, so captured packets carry complete checksums.
        for ns, dev in self._veths():
            self.exec(ns, ["ethtool", "-K", dev, "tx", "off"])

    def _veths(self) -> Iterator[tuple[str, str]]:
        yield self.gw_ns, GW_OUTSIDE_IF
        yield self.gw_ns, GW_INSIDE_IF
        yield self.server_ns, NS_IF
        for c in self.clients:
            yield self.gw_ns, c.bridge_port
            yield c.ns, c.ifname

    def teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        errors: list[str] = []
        # 1. processes we started, newest first, with their own stop signal and grace time
        for p in reversed(self._procs):
            try:
                self._stop(p)
            except Exception as exc:  # pragma: no cover - best effort
                errors.append(f"stop {p.name}: {exc}")
        # 2. anything else still living in our namespaces (daemons like pptp's call manager)
        for _ in range(3):
            pids = self._pids_in_namespaces()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and self._pids_in_namespaces():
                time.sleep(0.01)
        leftover = self._pids_in_namespaces()
        if leftover:
            errors.append(f"processes still in lab namespaces: {sorted(leftover)}")
        for m in self._mounts:
            if m.feeder is not None:
                m.feeder.stop()
        # 3. namespaces
        for ns in reversed(self.created_ns):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if res.returncode != 0 and Path(f"/run/netns/{ns}").exists():
                errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        # 4. syslog sink and temp dir
        if hasattr(self, "syslog"):
            self.syslog.close()
        if hasattr(self, "tmpdir") and not self.keep_tmp:
            mounted = [p for p in self.tmpdir.rglob("*") if p.is_dir() and os.path.ismount(p)]
            if mounted:
                errors.append(f"not removing {self.tmpdir}: mounts below it: {mounted}")
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))

    def _pids_in_namespaces(self) -> set[int]:
        """PIDs of processes whose network namespace is one of ours (never our own)."""
        wanted = set(self._ns_inodes.values())
        found: set[int] = set()
        if not wanted:
            return found
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid == me:
                continue
            try:
                st = os.stat(f"/proc/{pid}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                if state != "Z":
                    found.add(pid)
        return found

    def pids_in(self, ns: str) -> set[int]:
        """Live PIDs in one of the lab's network namespaces."""
        key = self._ns_inodes[ns]
        result: set[int] = set()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry.name}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == key:
                result.add(int(entry.name))
        return result

    # ------------------------------------------------------------------ commands

    def _run(
        self, argv: Sequence[str], *, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def _ns_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        if ns not in self._ns_inodes:
            raise LabError(f"{ns!r} is not a namespace of this lab")
        return ["ip", "netns", "exec", ns, *argv]

    def exec(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in one of the lab's namespaces."""
        full = self._ns_argv(ns, argv)
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise LabError(
                f"[{ns}] {' '.join(argv)} failed ({res.returncode}): "
                f"{res.stderr.strip() or res.stdout.strip()}"
            )
        return res

    def popen(
        self,
        ns: str | None,
        argv: Sequence[str],
        *,
        name: str | None = None,
        stdin: int | IO[Any] | socket.socket | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | socket.socket | None = None,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pass_fds: Sequence[int] = (),
        stop_signal: int = signal.SIGTERM,
        grace: float = 2.0,
        raw_argv: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a process in a lab namespace and record it for cleanup.

        Unless stdout/stderr are given, both go to a log file in the lab dir
        (``lab.process_log(proc)``). ``raw_argv`` runs argv as given (it must already
        enter a lab namespace, e.g. through ``PrivateMounts.argv``).
        """
        name = name or Path(argv[0]).name
        full = list(argv) if raw_argv or ns is None else self._ns_argv(ns, argv)
        log: Path | None = None
        log_file: IO[bytes] | None = None
        if stdout is None or stderr is None:
            log = self.tmpdir / f"proc-{len(self._procs):03d}-{name}.log"
            log_file = open(log, "wb")  # noqa: SIM115 - closed right after the fork
        try:
            proc = subprocess.Popen(
                full,
                stdin=stdin.fileno() if isinstance(stdin, socket.socket) else stdin,
                stdout=(
                    stdout.fileno()
                    if isinstance(stdout, socket.socket)
                    else stdout
                    if stdout is not None
                    else log_file
                ),
                stderr=stderr if stderr is not None else log_file,
                env=env,
                cwd=cwd,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._procs.append(_Proc(proc, name, ns, log, stop_signal, grace))
        return proc

    def process_log(self, proc: subprocess.Popen[bytes]) -> str:
        for p in self._procs:
            if p.proc is proc and p.log is not None:
                try:
                    return p.log.read_text(errors="replace")
                except OSError:
                    return ""
        return ""

    def stop_process(
        self, proc: subprocess.Popen[bytes], sig: int | None = None, timeout: float | None = None
    ) -> int | None:
        """Stop one recorded process by PID (signal, wait, then SIGKILL). Returns its status."""
        for p in self._procs:
            if p.proc is proc:
                return self._stop(p, sig, timeout)
        raise LabError(f"process {proc.pid} was not started by this lab")

    def _stop(self, p: _Proc, sig: int | None = None, timeout: float | None = None) -> int | None:
        proc = p.proc
        try:
            return self._signal_and_wait(
                proc, p.stop_signal if sig is None else sig, p.grace if timeout is None else timeout
            )
        finally:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    @staticmethod
    def _signal_and_wait(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int | None:
        if proc.poll() is not None:
            return proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=5)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.exec(ns, ["sysctl", "-qw", f"{key}={value}"])

    # ------------------------------------------------------------------ gateway modes

    def iptables(self, *args: str) -> str:
        """iptables (iptables-nft) in the gateway namespace."""
        return self.exec(self.gw_ns, ["iptables", "-w", *args]).stdout

    def gateway_masquerade_only(self) -> None:
        """Only `-t nat -A POSTROUTING -o out0 -j MASQUERADE` (TCP 1723 keeps being NATed).

        This is the mode to run natedit's worker under: it adds its own rules.
        """
        self.iptables("-t", "nat", "-A", "POSTROUTING", "-o", GW_OUTSIDE_IF, "-j", "MASQUERADE")

    def gateway_kernel_helper(self) -> None:
        """MASQUERADE plus the kernel's PPTP helper attached explicitly in the raw table.

        nf_conntrack_pptp / nf_nat_pptp are built into this kernel (no loadable modules);
        on a modular kernel they are loaded with modprobe first.
        """
        ensure_pptp_helper_available()
        self.gateway_masquerade_only()
        self.iptables(
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            str(PPTP_PORT),
            "-j",
            "CT",
            "--helper",
            "pptp",
        )

    def start_gateway_process(
        self,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool] | None = None,
        timeout: float = 10.0,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
        stop_signal: int = signal.SIGTERM,
        grace: float = 5.0,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in the gateway namespace (e.g. natedit's worker).

        ``ready`` is polled until it returns True; if the process exits first, or the
        timeout passes, LabError is raised with the process log. stdout and stderr go to
        ``lab.process_log(proc)``. At teardown it gets ``stop_signal`` and ``grace``
        seconds before SIGKILL.
        """
        proc = self.popen(
            self.gw_ns,
            argv,
            name=name or "gateway",
            env=env,
            cwd=cwd,
            stop_signal=stop_signal,
            grace=grace,
        )
        self.gateway_processes.append(proc)
        if ready is None:
            return proc
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LabError(
                    f"gateway process exited with {proc.returncode} before it was ready:\n"
                    + self.process_log(proc)[-4000:]
                )
            if ready():
                return proc
            if time.monotonic() > deadline:
                raise LabError(
                    f"gateway process not ready after {timeout}s:\n"
                    + self.process_log(proc)[-4000:]
                )
            time.sleep(0.02)

    def conntrack(self, *args: str) -> str:
        """conntrack(8) in the gateway namespace, e.g. ``lab.conntrack("-L", "-p", "gre")``."""
        res = self.exec(self.gw_ns, ["conntrack", *args], check=False)
        return res.stdout

    def ruleset(self) -> str:
        """The gateway's full nft ruleset (what iptables-nft and anyone else installed)."""
        return self.exec(self.gw_ns, ["nft", "list", "ruleset"], check=False).stdout

    # ------------------------------------------------------------------ mount namespaces

    def private_mounts(
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
        directory = self.tmpdir / f"mnt-{name}"
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
        holder = self.popen(
            ns,
            argv,
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
        self._mounts.append(mounts)
        return mounts


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


_HELPER_CHECKED = False


def ensure_pptp_helper_available() -> None:
    """Make sure nf_conntrack_pptp and nf_nat_pptp exist (built in, or load the modules)."""
    global _HELPER_CHECKED
    if _HELPER_CHECKED:
        return
    if Path("/proc/modules").exists():
        for mod in ("nf_conntrack_pptp", "nf_nat_pptp"):
            subprocess.run(["modprobe", mod], capture_output=True)
    _HELPER_CHECKED = True
