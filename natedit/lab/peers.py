"""The real PPTP peers: pptpd (with an echo stand-in for pppd) and pptp-linux clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .gateway import PPTP_PORT
from .mounts import PrivateMounts
from .procs import LabError, which
from .topology import SERVER_ADDR, Lab

STANDIN_MARKER = b"NEH-STANDIN"

# pptpctrl runs this instead of pppd, with the call's pty as stdin/stdout (cooked mode):
#   <ppp> local file <options> 115200 <local:remote> ipparam <client> remotenumber <client>
# It sets the tty raw, announces itself with one valid HDLC frame (pptpctrl does not read
# GRE before the "pppd" has written something), logs its PIDs, then echoes every byte.
_STANDIN = r"""#!/usr/bin/python3 -IS
import os, sys, tty

def fcs16(data):
    fcs = 0xFFFF
    for b in data:
        fcs ^= b
        for _ in range(8):
            fcs = (fcs >> 1) ^ 0x8408 if fcs & 1 else fcs >> 1
    return fcs

def hdlc(frame):
    fcs = fcs16(frame) ^ 0xFFFF
    out = bytearray(b"\x7e")
    for b in frame + bytes((fcs & 0xFF, fcs >> 8)):
        if b < 0x20 or b in (0x7E, 0x7D):
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    out.append(0x7E)
    return bytes(out)

tty.setraw(0)
pid, ppid = os.getpid(), os.getppid()
fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, ("%d %d %s\n" % (pid, ppid, " ".join(sys.argv[1:]))).encode())
os.close(fd)
info = MARKER + b" pid=%d ppid=%d" % (pid, ppid)
os.write(1, hdlc(b"\xff\x03\x4e\x45" + info))
os.execvp("cat", ["cat"])
"""


@dataclass(frozen=True)
class StandinInfo:
    """One call on the server: the echo stand-in's PID and its pptpctrl's PID."""

    pid: int
    pptpctrl_pid: int
    args: str


def parse_standin_hello(frame: bytes) -> StandinInfo | None:
    """Recognise the stand-in's first frame (as deframed by the harness, FCS removed).

    Fields other than pid and ppid (the Python PAC adds ``call=<own> peer=<peer>
    conn=<n>``) end up in ``args``, in their order.
    """
    idx = frame.find(STANDIN_MARKER)
    if idx < 0:
        return None
    parts = [part for part in frame[idx + len(STANDIN_MARKER) :].split() if b"=" in part]
    fields = dict(part.split(b"=", 1) for part in parts)
    extra = [p for p in parts if p.split(b"=", 1)[0] not in (b"pid", b"ppid")]
    try:
        return StandinInfo(
            int(fields[b"pid"]), int(fields[b"ppid"]), b" ".join(extra).decode(errors="replace")
        )
    except (KeyError, ValueError):
        return None


@dataclass
class PptpServer:
    """pptpd in the server namespace, in its own mount namespace, foreground (-f)."""

    lab: Lab
    directory: Path
    mounts: PrivateMounts
    proc: subprocess.Popen[bytes]
    pidfile: Path
    standin_log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def calls(self) -> list[StandinInfo]:
        """Every call pptpd has started (in order), from the stand-ins' own log."""
        result: list[StandinInfo] = []
        try:
            text = self.standin_log.read_text()
        except FileNotFoundError:
            return result
        for line in text.splitlines():
            parts = line.split(" ", 2)
            if len(parts) >= 2:
                result.append(
                    StandinInfo(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "")
                )
        return result

    def end_call(self, call: StandinInfo, how: str = "standin") -> None:
        """End one call from the server side, by PID.

        ``how="pptpctrl"``: SIGTERM to the call's pptpctrl, which sends
        Call-Disconnect-Notify (with its own Call ID) and Stop-Control-Connection-Request.
        ``how="standin"``: the "pppd" exits (SIGTERM to the stand-in); pptpctrl then just
        closes the TCP connection, no CDN.
        """
        if how not in ("standin", "pptpctrl"):
            raise ValueError(how)
        pid = call.pid if how == "standin" else call.pptpctrl_pid
        if pid not in self.lab.pids_in(self.mounts.ns):
            raise LabError(f"pid {pid} is not a process of the server's namespace")
        os.kill(pid, signal.SIGTERM)

    def stop(self, timeout: float = 3.0) -> int | None:
        """Stop the pptpd manager by PID (SIGTERM). Its pptpctrl children are not touched."""
        return self.lab.stop_process(self.proc, signal.SIGTERM, timeout)


def start_pptpd(
    lab: Lab,
    *,
    debug: bool = True,
    timeout: float = 5.0,
    node: str = "srv",
    address: str = SERVER_ADDR,
    name: str = "pptpd",
) -> PptpServer:
    """Start pptpd (-f foreground, own config, own pid file) and wait until it listens.

    By default the lab's outside server (node ``srv``, on ``SERVER_ADDR``); ``node``,
    ``address`` and ``name`` put another one elsewhere (an inside server behind a port
    forward, one on the gateway itself).
    """
    directory = lab.tmpdir / name
    directory.mkdir()
    standin_log = directory / "standin.log"
    standin = directory / "standin.py"
    standin.write_text(
        _STANDIN.replace(
            "tty.setraw(0)",
            f"LOG = {str(standin_log)!r}\nMARKER = {STANDIN_MARKER!r}\ntty.setraw(0)",
        )
    )
    standin.chmod(0o755)
    options = directory / "options"
    options.write_text("# not read by the stand-in\n")
    conf = directory / "pptpd.conf"
    conf.write_text(
        f"ppp {standin}\noption {options}\nlocalip 10.99.0.1\nremoteip 10.99.0.100-199\n"
    )
    pidfile = directory / "pptpd.pid"
    mounts = lab.private_mounts(lab.node(node), name)
    argv = [which("pptpd") or "pptpd", "-f", "-c", str(conf), "-p", str(pidfile), "-l", address]
    if debug:
        argv.append("-d")
    proc = lab.popen(None, mounts.argv(argv), name=name, raw_argv=True)
    server = PptpServer(lab, directory, mounts, proc, pidfile, standin_log)
    deadline = time.monotonic() + timeout
    while not _listening(proc.pid, PPTP_PORT):
        if proc.poll() is not None:
            raise LabError(f"pptpd exited ({proc.returncode}): {lab.process_log(proc)}")
        if time.monotonic() > deadline:
            raise LabError(f"pptpd does not listen on {address}:1723")
        time.sleep(0.01)
    return server


def _listening(pid: int, port: int) -> bool:
    """Whether the network namespace of ``pid`` has a TCP listener on ``port``."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        cols = line.split()
        if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
            return True
    return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _mnt_ns(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class PptpClient:
    """One pptp-linux call (``pptp <server> --nolaunchpppd``) and the harness end of its
    two-way PPP descriptor (a socketpair carrying async-HDLC frames)."""

    lab: Lab
    index: int  # the client namespace index
    key: int  # the pump key (unique per call)
    mounts: PrivateMounts
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    forced_call_id: int | None  # the private Call ID this call was made to pick, if forced
    extra: dict[str, object] = field(default_factory=dict)
    node: str | None = None  # the lab node it runs in, when not client ``index``
    server: str = SERVER_ADDR  # the address it calls

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ns(self) -> str:
        return self.mounts.ns

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call_manager_pids(self) -> set[int]:
        """pptp's call manager (comm 'pptpcm', daemonised, parent is init) for this mount ns."""
        mnt = _mnt_ns(self.mounts.pid)
        return {
            pid
            for pid in self.lab.pids_in(self.ns)
            if _comm(pid) == "pptpcm" and _mnt_ns(pid) == mnt
        }

    def kill(self, sig: int = signal.SIGTERM, timeout: float = 2.0) -> int | None:
        """Kill this call's pptp (the GRE/HDLC copier, comm 'pptpgw') by PID."""
        return self.lab.stop_process(self.proc, sig, timeout)

    def close_ppp(self) -> None:
        """Close the harness end of the PPP descriptor (pptp sees EOF and hangs up)."""
        with contextlib.suppress(OSError):
            self.sock.close()


def start_pptp_client(
    lab: Lab,
    index: int,
    *,
    forced_call_id: int | Sequence[int] | None = None,
    share_with: PptpClient | None = None,
    key: int | None = None,
    extra_args: Sequence[str] = (),
    node: str | None = None,
    server: str = SERVER_ADDR,
) -> PptpClient:
    """Start pptp-linux in client namespace ``index`` for one call.

    ``node`` runs it in another lab node instead (an outside client, the gateway
    itself; ``index`` then only numbers it in names), ``server`` calls another address
    than the lab's server.

    Each client normally gets its own private mount namespace (own /run, so its own call
    manager and control connection). ``share_with=other`` runs this pptp in ``other``'s
    mount namespace instead: it then joins other's call manager, i.e. a second call on
    the same control connection (``forced_call_id`` of this call is ignored then; give
    ``other`` a sequence of IDs for distinct forced IDs).
    """
    label = node or f"c{index + 1}"
    ns = lab.node(node) if node is not None else lab.clients[index].ns
    if share_with is not None:
        if share_with.index != index:
            raise ValueError("share_with must be a call of the same client namespace")
        mounts = share_with.mounts
        spec = mounts.forced_call_id
        if isinstance(spec, int) or spec is None:
            forced_call_id = spec
        else:
            forced_call_id = spec[min(mounts.calls, len(spec) - 1)]
    else:
        mounts = lab.private_mounts(ns, f"{label}-{lab.serial()}", forced_call_id=forced_call_id)
    if key is None:
        key = index if share_with is None else 1000 + lab.serial()
    this_call_id: int | None
    if forced_call_id is None or isinstance(forced_call_id, int):
        this_call_id = forced_call_id
    else:
        this_call_id = forced_call_id[0]
    mounts.calls += 1
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [
        which("pptp") or "pptp",
        server,
        "--nolaunchpppd",
        "--nohostroute",
        "--loglevel",
        "1",
        "--logstring",
        f"{label}k{key}",
        *extra_args,
    ]
    try:
        proc = lab.popen(
            None,
            mounts.argv(argv),
            name=f"pptp-{label}-k{key}",
            raw_argv=True,
            stdin=theirs,
            stdout=theirs,
            stop_signal=signal.SIGTERM,
            grace=2.0,
        )
    finally:
        theirs.close()
    ours.setblocking(False)
    return PptpClient(lab, index, key, mounts, proc, ours, this_call_id, node=node, server=server)
