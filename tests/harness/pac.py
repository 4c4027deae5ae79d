"""A small PPTP Access Concentrator (PAC) that takes several calls per control connection.

pptpd allows one call per control connection (a second Outgoing-Call-Request replaces the
first call), so two calls of one pptp-linux call manager can never both work against it.
This PAC answers every Outgoing-Call-Request and echoes each call's PPP frames back
within that call, which is what a NAT that supports several calls per control connection
has to be tested against. It is a test peer, not product code.

Run it in the lab's server namespace (``start_pac(lab)`` does that, so the Lab stops it
by PID)::

    python -m tests.harness.pac --listen 198.51.100.2 [--call-id-base 0]
        [--call-id-step 128] [--cdn-call-id own|peer]

Control connection (TCP 1723), framed by the Length field (several messages per segment,
messages split across segments):

- Start-Control-Connection-Request -> Reply (result 1); Echo-Request -> Echo-Reply (same
  identifier); Outgoing-Call-Request -> Outgoing-Call-Reply (result 1, a fresh own Call
  ID, Peer's Call ID = the request's Call ID) for EVERY request; Call-Clear-Request ->
  Call-Disconnect-Notify (result 4, "request"); Stop-Control-Connection-Request -> Reply,
  then close. Set-Link-Info and anything else: logged, ignored. A malformed header closes
  the connection.
- Own Call IDs are ``base + n * step`` (mod 65536) over the PAC's lifetime: 0, 128, 256,
  ... by default, like pptpd.
- The Call ID of a Call-Disconnect-Notify is the PAC's own (RFC 2637, pptpd) unless
  ``--cdn-call-id peer`` (pptp-linux looks it up among its own Call IDs).

GRE (raw IP socket, protocol 47): a packet whose Call ID is one of the PAC's calls and
whose source is that call's control-connection peer is answered to that source with the
call's Peer's Call ID, the same PPP payload, the PAC's own sequence number (S) and an ack
of the received one (A). Right after a call is set up the PAC sends a hello frame (the
same kind as the pptpd stand-in's: ``NEH-STANDIN pid=<pac> ppid=<pac> call=<own>
peer=<peer> conn=<n>``, see ``peers.parse_standin_hello``), repeated every
``HELLO_INTERVAL`` until the peer has sent GRE on the call (the PNS may not listen yet).

Every event is one ``<event> key=value ...`` line on stderr. SIGTERM: each open call gets
a Call-Disconnect-Notify (result 3, admin shutdown), each connection a
Stop-Control-Connection-Request, then the PAC exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from natedit.core.errors import ProtocolError
from natedit.core.wire import (
    CONTROL_HEADER_LEN,
    IPPROTO_GRE,
    MessageType,
    build_control_message,
    parse_control_header,
    parse_gre,
    parse_ipv4,
)
from natedit.lab.hdlc import PPP_PROTO_HARNESS, ppp_frame
from natedit.lab.peers import STANDIN_MARKER
from natedit.lab.topology import PPTP_PORT, SERVER_ADDR, Lab, LabError

MT = MessageType
GRE_HEADER = struct.Struct("!BBHHH")
HELLO_INTERVAL = 0.25
HELLO_COUNT = 20
CDN_RESULT_ADMIN_SHUTDOWN = 3
CDN_RESULT_REQUEST = 4
STOP_REASON_LOCAL_SHUTDOWN = 3
REPO_ROOT = Path(__file__).resolve().parents[2]


def gre_packet(call_id: int, payload: bytes, *, seq: int | None, ack: int | None) -> bytes:
    """An enhanced GRE header plus payload (no IP header: the raw socket adds it)."""
    flags0 = 0x20 | (0x10 if seq is not None else 0)
    flags1 = 0x01 | (0x80 if ack is not None else 0)
    out = GRE_HEADER.pack(flags0, flags1, 0x880B, len(payload), call_id)
    if seq is not None:
        out += struct.pack("!I", seq & 0xFFFFFFFF)
    if ack is not None:
        out += struct.pack("!I", ack & 0xFFFFFFFF)
    return out + payload


@dataclass
class PacCall:
    conn: int
    call_id: int  # the PAC's own
    peer_call_id: int  # the PNS's, as the request carried it
    addr: str  # the control connection's peer: GRE comes from and goes to it
    tx_seq: int = 0
    rx_seq: int | None = None
    rx: int = 0
    tx: int = 0
    heard: bool = False  # the peer has sent GRE on this call
    hellos_left: int = HELLO_COUNT
    next_hello: float = 0.0

    def describe(self) -> str:
        return (
            f"conn={self.conn} call={self.call_id} peer={self.peer_call_id} addr={self.addr}"
            f" rx={self.rx} tx={self.tx}"
        )


@dataclass
class Connection:
    conn: int
    addr: str
    buf: bytearray = field(default_factory=bytearray)
    calls: list[PacCall] = field(default_factory=list)


class Pac:
    """The PAC's protocol logic, without I/O (the loop in :func:`serve` does the I/O)."""

    def __init__(
        self,
        *,
        call_id_base: int = 0,
        call_id_step: int = 128,
        cdn_call_id: str = "own",
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        if cdn_call_id not in ("own", "peer"):
            raise ValueError(cdn_call_id)
        self.call_id_base = call_id_base
        self.call_id_step = call_id_step
        self.cdn_call_id = cdn_call_id
        self.log = log
        self.connections: dict[int, Connection] = {}
        self.calls: dict[int, PacCall] = {}  # by own Call ID
        self.opened = 0
        self.hello_info = b" pid=%d ppid=%d" % (os.getpid(), os.getpid())
        self._unknown_logged: set[tuple[str, int]] = set()

    # ---------------------------------------------------------------- control

    def open_connection(self, conn: int, addr: str) -> None:
        self.connections[conn] = Connection(conn, addr)
        self.log(f"connect conn={conn} addr={addr}")

    def feed(self, conn: int, data: bytes) -> tuple[list[bytes], bool]:
        """Bytes from connection ``conn``: the replies to send, and whether to close."""
        c = self.connections[conn]
        c.buf += data
        replies: list[bytes] = []
        while len(c.buf) >= CONTROL_HEADER_LEN:
            try:
                header = parse_control_header(c.buf)
            except ProtocolError as exc:
                self.log(f"malformed conn={conn} reason={exc} closing")
                return replies, True
            if len(c.buf) < header.length:
                break
            message = bytes(c.buf[: header.length])
            del c.buf[: header.length]
            reply, close = self._handle(c, header.message_type, message)
            replies += reply
            if close:
                return replies, True
        return replies, False

    def _handle(self, c: Connection, mt: MessageType, msg: bytes) -> tuple[list[bytes], bool]:
        conn = c.conn
        if mt == MT.START_CONTROL_CONNECTION_REQUEST:
            self.log(f"rx conn={conn} msg=SCCRQ reply=SCCRP result=1")
            reply = bytearray(build_control_message(MT.START_CONTROL_CONNECTION_REPLY))
            struct.pack_into("!IIHH", reply, 16, 3, 3, 0, 1)  # framing, bearer, channels, fw
            reply[28:39] = b"natedit-pac"
            reply[92:99] = b"natedit"
            return [bytes(reply)], False
        if mt == MT.ECHO_REQUEST:
            self.log(f"rx conn={conn} msg=ECHORQ reply=ECHORP")
            reply = bytearray(build_control_message(MT.ECHO_REPLY))
            reply[12:16] = msg[12:16]  # identifier
            return [bytes(reply)], False
        if mt == MT.OUTGOING_CALL_REQUEST:
            (peer_call_id, serial) = struct.unpack_from("!HH", msg, 12)
            call_id = (self.call_id_base + self.opened * self.call_id_step) & 0xFFFF
            self.opened += 1
            call = PacCall(conn, call_id, peer_call_id, c.addr)
            self.calls[call_id] = call
            c.calls.append(call)
            self.log(
                f"open conn={conn} call={call_id} peer={peer_call_id} serial={serial}"
                f" addr={c.addr} calls_on_conn={len(c.calls)}"
            )
            reply = bytearray(
                build_control_message(
                    MT.OUTGOING_CALL_REPLY, call_id=call_id, peer_call_id=peer_call_id
                )
            )
            struct.pack_into("!IHH", reply, 20, 10_000_000, 64, 0)  # speed, window, delay
            return [bytes(reply)], False
        if mt == MT.CALL_CLEAR_REQUEST:
            (peer_call_id,) = struct.unpack_from("!H", msg, 12)
            found = [x for x in c.calls if x.peer_call_id == peer_call_id]
            if not found:
                self.log(f"rx conn={conn} msg=CCRQ peer={peer_call_id} unknown-call")
                return [], False
            call = found[0]
            self._drop_call(c, call, "clear-request")
            return [self._cdn(call, CDN_RESULT_REQUEST)], False
        if mt == MT.STOP_CONTROL_CONNECTION_REQUEST:
            self.log(f"rx conn={conn} msg=StopCCRQ reason={msg[12]} reply=StopCCRP closing")
            return [build_control_message(MT.STOP_CONTROL_CONNECTION_REPLY)], True
        if mt == MT.SET_LINK_INFO:
            (peer_call_id,) = struct.unpack_from("!H", msg, 12)
            self.log(f"rx conn={conn} msg=SLI peer={peer_call_id} ignored")
            return [], False
        self.log(f"rx conn={conn} msg={mt.name} ignored")
        return [], False

    def _cdn(self, call: PacCall, result: int) -> bytes:
        cid = call.call_id if self.cdn_call_id == "own" else call.peer_call_id
        msg = bytearray(build_control_message(MT.CALL_DISCONNECT_NOTIFY, call_id=cid))
        msg[14] = result
        self.log(f"tx conn={call.conn} msg=CDN call_id={cid} result={result}")
        return bytes(msg)

    def _drop_call(self, c: Connection, call: PacCall, why: str) -> None:
        c.calls.remove(call)
        self.calls.pop(call.call_id, None)
        self.log(f"close {call.describe()} why={why}")

    def close_connection(self, conn: int, why: str) -> None:
        c = self.connections.pop(conn, None)
        if c is None:
            return
        for call in list(c.calls):
            self._drop_call(c, call, why)
        self.log(f"disconnect conn={conn} why={why}")

    def shutdown_messages(self, conn: int) -> list[bytes]:
        """What to send on ``conn`` before exiting: a CDN per call, then Stop-CCRQ."""
        c = self.connections[conn]
        out = [self._cdn(call, CDN_RESULT_ADMIN_SHUTDOWN) for call in c.calls]
        stop = bytearray(build_control_message(MT.STOP_CONTROL_CONNECTION_REQUEST))
        stop[12] = STOP_REASON_LOCAL_SHUTDOWN
        self.log(f"tx conn={conn} msg=StopCCRQ reason={STOP_REASON_LOCAL_SHUTDOWN}")
        return [*out, bytes(stop)]

    # ---------------------------------------------------------------- GRE

    def gre(self, packet: bytes) -> list[tuple[str, bytes]]:
        """One received IPv4 packet carrying GRE: the GRE packets to send, with destinations."""
        try:
            ip = parse_ipv4(packet)
            if ip.protocol != IPPROTO_GRE:
                return []
            gre = parse_gre(packet, ip.ihl)
        except ProtocolError as exc:
            self.log(f"gre-drop reason={exc}")
            return []
        src = socket.inet_ntoa(ip.src)
        call = self.calls.get(gre.call_id)
        if call is None or call.addr != src:
            key = (src, gre.call_id)
            if key not in self._unknown_logged:  # once per (source, Call ID)
                self._unknown_logged.add(key)
                why = "unknown-call" if call is None else f"wrong-source(call-addr={call.addr})"
                self.log(f"gre-drop src={src} call={gre.call_id} reason={why}")
            return []
        if not call.heard:
            call.heard = True
            self.log(f"gre-first call={call.call_id} src={src} seq={gre.sequence} ack={gre.ack}")
        if gre.sequence is None:
            return []  # ack only
        start = ip.ihl + gre.header_length
        payload = packet[start : start + gre.payload_length]
        call.rx += 1
        call.rx_seq = gre.sequence
        return [(call.addr, self._data(call, payload))]

    def _data(self, call: PacCall, payload: bytes) -> bytes:
        out = gre_packet(call.peer_call_id, payload, seq=call.tx_seq, ack=call.rx_seq)
        call.tx_seq += 1
        call.tx += 1
        return out

    def hello_frame(self, call: PacCall) -> bytes:
        info = STANDIN_MARKER + self.hello_info
        info += b" call=%d peer=%d conn=%d" % (call.call_id, call.peer_call_id, call.conn)
        return ppp_frame(PPP_PROTO_HARNESS, info)

    def due_hellos(self, now: float) -> list[tuple[str, bytes]]:
        """Hello frames due at ``now`` (each call's until the peer has sent GRE on it)."""
        out: list[tuple[str, bytes]] = []
        for call in self.calls.values():
            if call.heard or call.hellos_left <= 0 or call.next_hello > now:
                continue
            call.hellos_left -= 1
            call.next_hello = now + HELLO_INTERVAL
            out.append((call.addr, self._data(call, self.hello_frame(call))))
            self.log(f"hello call={call.call_id} peer={call.peer_call_id} seq={call.tx_seq - 1}")
        return out

    def next_hello_in(self, now: float) -> float | None:
        due = [c.next_hello for c in self.calls.values() if not c.heard and c.hellos_left > 0]
        return max(0.0, min(due) - now) if due else None


# -------------------------------------------------------------------- the process


def serve(listen: str, port: int, pac: Pac) -> int:
    """The PAC's event loop; returns on SIGTERM/SIGINT (after the shutdown messages)."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((listen, port))
    listener.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    sel.register(raw, selectors.EVENT_READ, "gre")
    sel.register(listener, selectors.EVENT_READ, "listen")
    socks: dict[int, socket.socket] = {}
    serial = 0
    pac.log(f"listening addr={listen} port={port} pid={os.getpid()}")

    def send_gre(items: list[tuple[str, bytes]]) -> None:
        for dst, data in items:
            try:
                raw.sendto(data, (dst, 0))
            except OSError as exc:
                pac.log(f"gre-send-error dst={dst} error={exc}")

    def close(conn: int, why: str) -> None:
        sock = socks.pop(conn)
        sel.unregister(sock)
        sock.close()
        pac.close_connection(conn, why)

    while not stop:
        now = time.monotonic()
        send_gre(pac.due_hellos(now))
        for key, _ in sel.select(pac.next_hello_in(time.monotonic())):
            what = key.data
            if what == "wake":
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(64)
            elif what == "listen":
                sock, (addr, peer_port) = listener.accept()
                sock.settimeout(2.0)
                serial += 1
                socks[serial] = sock
                sel.register(sock, selectors.EVENT_READ, serial)
                pac.open_connection(serial, addr)
                pac.log(f"accept conn={serial} port={peer_port}")
            elif what == "gre":
                send_gre(pac.gre(raw.recv(65535)))
            elif isinstance(what, int) and what in socks:
                try:
                    data = socks[what].recv(65536)
                except OSError as exc:
                    close(what, f"error:{exc}")
                    continue
                if not data:
                    close(what, "eof")
                    continue
                replies, must_close = pac.feed(what, data)
                try:
                    for reply in replies:
                        socks[what].sendall(reply)
                except OSError as exc:
                    close(what, f"send-error:{exc}")
                    continue
                if must_close:
                    close(what, "stop")
    pac.log(f"signal {signal.Signals(stop[0]).name}: shutting down")
    for conn in list(socks):
        with contextlib.suppress(OSError):
            for message in pac.shutdown_messages(conn):
                socks[conn].sendall(message)
        close(conn, "shutdown")
    for s in (listener, raw, wake_r, wake_w):
        s.close()
    sel.close()
    pac.log("exit")
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.pac", description=__doc__)
    parser.add_argument("--listen", required=True, help="address for TCP 1723 (and GRE)")
    parser.add_argument("--port", type=int, default=PPTP_PORT)
    parser.add_argument("--call-id-base", type=int, default=0)
    parser.add_argument("--call-id-step", type=int, default=128)
    parser.add_argument("--cdn-call-id", choices=("own", "peer"), default="own")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(f"{time.monotonic():.3f} {line}", file=out, flush=True)

    pac = Pac(
        call_id_base=args.call_id_base,
        call_id_step=args.call_id_step,
        cdn_call_id=args.cdn_call_id,
        log=log,
    )
    return serve(args.listen, args.port, pac)


# -------------------------------------------------------------------- the harness side


_OPEN_RE = re.compile(r" open conn=(\d+) call=(\d+) peer=(\d+) serial=(\d+) addr=(\S+)")


@dataclass(frozen=True)
class PacCallRecord:
    """One Outgoing-Call-Request the PAC answered (from its log)."""

    conn: int
    call_id: int
    peer_call_id: int
    serial: int
    addr: str


@dataclass
class PacServer:
    """The PAC running in the lab's server namespace (stopped by the Lab, by PID)."""

    lab: Lab
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.lab.process_log(self.proc)

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def calls(self) -> list[PacCallRecord]:
        """Every call the PAC opened, in order."""
        result: list[PacCallRecord] = []
        for line in self.log_lines():
            m = _OPEN_RE.search(line)
            if m:
                conn, call_id, peer, serial = (int(m.group(i)) for i in range(1, 5))
                result.append(PacCallRecord(conn, call_id, peer, serial, m.group(5)))
        return result

    def stop(self, timeout: float = 3.0) -> int | None:
        """SIGTERM: the PAC disconnects every call, stops every control connection, exits."""
        return self.lab.stop_process(self.proc, signal.SIGTERM, timeout)


def start_pac(lab: Lab, *, extra_args: Sequence[str] = (), timeout: float = 10.0) -> PacServer:
    """Start the PAC in the server namespace and wait until it listens."""
    argv = [sys.executable, "-m", "tests.harness.pac", "--listen", SERVER_ADDR, *extra_args]
    proc = lab.popen(lab.server_ns, argv, name="pac", cwd=REPO_ROOT)
    server = PacServer(lab, proc)
    deadline = time.monotonic() + timeout
    while " listening " not in server.log():
        if proc.poll() is not None:
            raise LabError(f"the PAC exited ({proc.returncode}): {server.log()[-4000:]}")
        if time.monotonic() > deadline:
            raise LabError(f"the PAC does not listen after {timeout}s: {server.log()[-4000:]}")
        time.sleep(0.01)
    return server


if __name__ == "__main__":
    sys.exit(main())
