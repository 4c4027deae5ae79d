"""``natedit lab``: natedit with real PPTP peers, on one machine, in a minute.

Builds a throw-away gateway in network namespaces (:mod:`natedit.lab.topology`),
runs ``natedit run`` in it on the built-in default policy, starts Debian's
``pptpd`` and N ``pptp-linux`` clients all forced onto one private Call ID
(the case the kernel without its helper cannot do), pumps PPP frames through
every call, and shows while they flow the live call table (``natedit calls``
against the worker's metrics endpoint inside the gateway namespace) and a few
``natedit_*`` metrics. At the end, or on Ctrl-C or SIGTERM: a summary (frames
sent and returned per client; frames delivered to the wrong client, which
must be 0), then everything is removed: processes (by PID), namespaces,
temp files. Nothing outside the namespaces it created is touched.

``--port-forward`` (:func:`main`'s ``port_forward``) adds other PPTP beside
natedit's own calls (issue 16): an inside pptpd in a DMZ, published on the
gateway's public address by the operator's DNAT
(:func:`natedit.lab.coexist.port_forward`), called by two outside clients on
addresses of their own and two behind one remote NAT; natedit must leave those
calls alone while it translates its inside clients'.

Exit status: 0 when every call was clean, 1 when one was not or the lab could
not be built (a missing Debian package: the ``apt-get install`` line to run;
not root), 128 + the signal number after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TextIO

from . import coexist
from .netns import Topology, unique_prefix
from .peers import PptpClient, start_pptp_client, start_pptpd
from .procs import LabError, which
from .pump import FramePump
from .topology import PUBLIC_GW_ADDR, REQUIRED_COMMANDS, Lab

DEFAULT_CLIENTS = 3
DEFAULT_DURATION = 20.0
DEFAULT_CALL_ID = 0x1234
SHOW_INTERVAL = 3.0
"""Seconds between two views of the call table and the metrics."""
FRAME_GAP = 0.02
"""Seconds between two rounds of frames (one frame per call each): 50 frames/s per call."""
CONNECT_TIMEOUT = 8.0
"""Seconds for every call to connect (pptp-linux waits 1 s for its call manager)."""
RETURN_TIMEOUT = 2.0
"""Seconds to wait at the end for frames still on their way."""
METRICS = "127.0.0.1:9723"
"""The built-in policy's metrics endpoint, inside the gateway namespace."""

PACKAGES = {
    "ip": "iproute2",
    "iptables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "ethtool": "ethtool",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "mount": "mount",
    "sysctl": "procps",
    "pptpd": "pptpd",
    "pptpctrl": "pptpd",
    "pptp": "pptp-linux",
    "cat": "coreutils",
}
"""The Debian package of every command the lab and the worker run."""

EXCERPT = (
    "natedit_calls{",
    "natedit_calls_mapped_total ",
    "natedit_call_ids_in_use{",
    "natedit_gre_packets_total{",
    "natedit_packets_dropped_total{",
    "natedit_queue_dropped_total{",
)
"""Metric lines shown while frames flow."""
_ONLY_WHEN_NOT_ZERO = ("natedit_calls{", "natedit_packets_dropped_total",
                       "natedit_queue_dropped_total")


def missing_packages(have: Callable[[str], str | None] | None = None) -> list[str]:
    """The Debian packages to install for the lab, in a stable order (empty: none).

    ``have`` finds a command (default: :func:`natedit.lab.procs.which`).
    """
    find = have or which
    commands = (*REQUIRED_COMMANDS, "iptables-save", "iptables-restore")
    return sorted({PACKAGES.get(cmd, cmd) for cmd in commands if find(cmd) is None})


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: stop, summarise, tear down (a BaseException, like Ctrl-C's)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class _Signals:
    """The first SIGINT or SIGTERM raises :class:`Interrupted`; later ones only say that
    the lab is being removed (a teardown is never cut short)."""

    out: TextIO
    armed: bool = True
    received: int | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.armed and self.received is None:
            self.received = signum
            raise Interrupted(signum)
        self.received = self.received or signum
        self.out.write(f"natedit lab: {signal.Signals(signum).name}: removing the lab first\n")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        old = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclass
class _Progress:
    out: TextIO
    total: int
    started: float = field(default_factory=time.monotonic)
    n: int = 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.n += 1
        self.out.write(f"[{self.n}/{self.total}] {what} ... ")
        self.out.flush()
        t0 = time.monotonic()
        try:
            yield
        except BaseException:
            self.out.write("failed\n")
            raise
        self.out.write(f"done ({time.monotonic() - t0:.1f} s)\n")
        self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


@dataclass
class _Call:
    client: str  # c1.., or an outside caller's node (oc1, rc1, ...)
    address: str
    call: PptpClient
    public_call_id: str = "?"


def main(clients: int = DEFAULT_CLIENTS, duration: float = DEFAULT_DURATION,
         call_id: int = DEFAULT_CALL_ID, interval: float = SHOW_INTERVAL,
         out: TextIO = sys.stdout, port_forward: bool = False) -> int:
    """Run the lab; the exit status (see the module docstring)."""
    problems = []
    missing = missing_packages()
    if missing:
        problems.append("missing Debian packages; install them with:\n"
                        f"  apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        problems.append("natedit lab needs root: it creates network namespaces, "
                        "mounts and firewall rules in them (try: sudo natedit lab)")
    if problems:
        for problem in problems:
            print(f"natedit lab: {problem}", file=sys.stderr)
        return 1
    signals = _Signals(out)
    with signals.installed():
        try:
            return _run(clients, duration, call_id, interval, out, signals, port_forward)
        except Interrupted as stop:
            out.write(f"natedit lab: {stop}: stopped; the lab is removed\n")
            return 128 + stop.signum
        except LabError as exc:
            print(f"natedit lab: error: {exc}", file=sys.stderr)
            return 1


_OUTSIDE_CALLERS = {**coexist.OUTSIDE_CLIENTS, **coexist.REMOTE_CLIENTS}
"""``--port-forward``: the nodes calling the published inside server, and their addresses."""


def _run(n_clients: int, duration: float, call_id: int, interval: float, out: TextIO,
         signals: _Signals, port_forward: bool = False) -> int:
    progress = _Progress(out, total=5)
    extra = coexist.PORT_FORWARD_LAB if port_forward else Topology(nodes=())
    lab = Lab(n_clients, prefix=unique_prefix("nelab"), extra=extra)
    progress.say(f"natedit lab: {n_clients} pptp-linux clients forced onto Call ID "
                 f"{call_id:#06x}, one pptpd, natedit between them (namespaces {lab.prefix}-*)")
    if port_forward:
        progress.say(f"    and an inside pptpd ({coexist.INSIDE_SERVER_ADDR}) published on "
                     f"{PUBLIC_GW_ADDR} by DNAT, called by {len(coexist.OUTSIDE_CLIENTS)} "
                     f"outside clients and {len(coexist.REMOTE_CLIENTS)} behind one remote "
                     f"NAT ({coexist.REMOTE_NAT_ADDR}), on the same Call ID")
    nodes = "gateway, server, " + (
        "inside server, outside clients, remote NAT, " if port_forward else "")
    with progress.step(f"network namespaces: {nodes}{n_clients} clients"):
        lab.__enter__()
    pump = FramePump()
    try:
        with progress.step("natedit run on the built-in default policy, in the gateway"):
            worker = _start_worker(lab, port_forward)
        progress.say("    " + _ready_line(lab, worker))
        with progress.step("pptpd on the server" + (" and on the inside server"
                                                    if port_forward else "")):
            start_pptpd(lab)
            if port_forward:
                start_pptpd(lab, node=coexist.INSIDE_SERVER,
                            address=coexist.INSIDE_SERVER_ADDR, name="pptpd-inside")
        calls: list[_Call] = []
        outside = _OUTSIDE_CALLERS if port_forward else {}
        with progress.step(f"{n_clients + len(outside)} pptp-linux calls, all with Call ID "
                           f"{call_id:#06x}"):
            for i, node in enumerate(lab.clients):
                call = start_pptp_client(lab, i, forced_call_id=call_id)
                pump.add(call.key, call.sock)
                calls.append(_Call(f"c{i + 1}", node.addr, call))
            for j, (name, addr) in enumerate(outside.items()):
                call = start_pptp_client(lab, j, forced_call_id=call_id, key=1000 + j,
                                         node=name, server=PUBLIC_GW_ADDR)
                pump.add(call.key, call.sock)
                calls.append(_Call(name, addr, call, public_call_id="-"))
            keys = [c.call.key for c in calls]
            stats = pump.stats
            pump.wait_until(lambda: all(stats[k].hellos or stats[k].eof for k in keys),
                            CONNECT_TIMEOUT)
            up = [k for k in keys if stats[k].hellos]
            if len(up) < len(keys):
                down = ", ".join(c.client for c in calls if not stats[c.call.key].hellos)
                raise LabError(f"{len(up)} of {len(keys)} calls connected (not: {down}):\n"
                               + lab.process_log(worker)[-2000:])
        until = "Ctrl-C" if duration <= 0 else f"{duration:g} s"
        progress.say(f"[5/5] frames flowing on {len(keys)} calls until {until}; "
                     f"the call table and metrics every {interval:g} s")
        started = time.monotonic()
        try:
            _pump(lab, pump, calls, started, duration, interval, out)
        except Interrupted:
            signals.armed = False
            out.write("\n")
            _finish(lab, pump, calls, started, out)
            raise
        signals.armed = False
        return _finish(lab, pump, calls, started, out)
    finally:
        signals.armed = False
        pump.close()
        _teardown(lab, out)


def _start_worker(lab: Lab, port_forward: bool = False) -> subprocess.Popen[bytes]:
    lab.gateway_masquerade_only()  # the operator's NAT for TCP 1723: natedit never adds one
    if port_forward:  # the operator's port forward, and a home router with the helper
        coexist.port_forward(lab.gateway, PUBLIC_GW_ADDR)
        lab.gateway_of(coexist.REMOTE_NAT, coexist.REMOTE_NAT_OUTSIDE_IF).kernel_helper()
    ready = lab.tmpdir / "natedit.ready"
    return lab.start_gateway_process(
        [sys.executable, "-m", "natedit", "run", "--ready-file", str(ready),
         "--pid-file", str(lab.tmpdir / "natedit.pid"), "--state", ""],
        ready=ready.exists, timeout=15.0, name="natedit")


def _ready_line(lab: Lab, worker: subprocess.Popen[bytes]) -> str:
    for line in lab.process_log(worker).splitlines():
        if line.startswith("natedit: ready"):
            return line
    return "natedit: ready"


def _pump(lab: Lab, pump: FramePump, calls: list[_Call], started: float, duration: float,
          interval: float, out: TextIO) -> None:
    keys = [c.call.key for c in calls]
    next_show = started
    while duration <= 0 or time.monotonic() - started < duration:
        pump.send_round(keys, 1, FRAME_GAP)
        if time.monotonic() >= next_show:
            _show(lab, pump, calls, started, out)
            next_show = time.monotonic() + interval


def _show(lab: Lab, pump: FramePump, calls: list[_Call], started: float, out: TextIO) -> None:
    """The call table and a metrics excerpt, read from the worker while frames flow."""
    python = sys.executable
    table = _while_pumping(pump, lab, [python, "-m", "natedit", "calls", "--metrics", METRICS])
    metrics = _while_pumping(pump, lab, [python, "-c", _FETCH_METRICS, METRICS])
    sent = sum(pump.stats[c.call.key].sent for c in calls)
    back = sum(pump.stats[c.call.key].received for c in calls)
    out.write(f"\n--- {time.monotonic() - started:4.1f} s: {sent} frames sent, {back} back "
              f"--- natedit calls (in the gateway namespace):\n")
    for line in table.splitlines():
        out.write(f"    {line}\n")
        words = line.split()
        for c in calls:
            if len(words) == 7 and words[0] == c.address:
                c.public_call_id = words[5]
    out.write("--- metrics excerpt (http://127.0.0.1:9723/metrics in the gateway):\n")
    for line in excerpt(metrics):
        out.write(f"    {line}\n")
    out.flush()


_FETCH_METRICS = (
    "import sys, urllib.request\n"
    "print(urllib.request.urlopen(f'http://{sys.argv[1]}/metrics', timeout=5).read().decode())"
)


def excerpt(metrics: str) -> list[str]:
    """The lines of :data:`EXCERPT` in a /metrics page, drops and queue drops only when not 0."""
    lines = []
    for line in metrics.splitlines():
        if not line.startswith(EXCERPT):
            continue
        if line.startswith(_ONLY_WHEN_NOT_ZERO) and float(line.rsplit(" ", 1)[1]) == 0:
            continue
        lines.append(line)
    return lines


def _while_pumping(pump: FramePump, lab: Lab, argv: Sequence[str]) -> str:
    """Run ``argv`` in the gateway namespace while the echoes keep being read."""
    proc = subprocess.Popen(["ip", "netns", "exec", lab.gw_ns, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            pump.poll(0.02)
        if proc.poll() is None:
            proc.kill()
        text, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return text.strip()


def _finish(lab: Lab, pump: FramePump, calls: list[_Call], started: float, out: TextIO) -> int:
    """Wait for the frames on their way, print the summary; 0 when every call was clean."""
    keys = [c.call.key for c in calls]
    pump.wait_returned(keys, RETURN_TIMEOUT)
    pump.linger(0.1)
    elapsed = time.monotonic() - started
    rows = [("CLIENT", "ADDRESS", "CALL-ID", "PUBLIC-ID", "SENT", "RETURNED", "FOREIGN")]
    clean = 0
    for c in calls:
        st = pump.stats[c.call.key]
        forced = c.call.forced_call_id
        rows.append((c.client, c.address, "-" if forced is None else f"{forced:#06x}",
                     c.public_call_id, str(st.sent), str(st.received), str(st.foreign)))
        if st.hellos and st.sent and st.received == st.sent and not (st.foreign or st.corrupt):
            clean += 1
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out.write(f"\n=== summary after {elapsed:.1f} s of frames:\n")
    for r in rows:
        out.write("    " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                  + "\n")
    foreign = sum(pump.stats[k].foreign for k in keys)
    events = [ln for ln in lab.process_log(lab.gateway_processes[0]).splitlines()
              if "event=" in ln]
    out.write(f"    frames delivered to the wrong client (foreign): {foreign}\n")
    out.write(f"    natedit's log: {len(events)} call events, the last ones:\n")
    for line in events[-2 * len(calls):]:
        out.write(f"      {line}\n")
    if clean == len(calls):
        out.write(f"    all {len(calls)} calls clean: every frame came back to the client "
                  "that sent it, through one public address, each call on its own public "
                  "Call ID\n")
        if any(c.call.node is not None for c in calls):
            out.write("    (the calls to the published inside server are not natedit's: "
                      "they passed through the operator's DNAT and MASQUERADE, untouched)\n")
        out.flush()
        return 0
    out.write(f"    {len(calls) - clean} of {len(calls)} calls NOT clean; natedit's log:\n")
    for line in lab.process_log(lab.gateway_processes[0]).splitlines()[-20:]:
        out.write(f"      {line}\n")
    out.flush()
    return 1


def _teardown(lab: Lab, out: TextIO) -> None:
    out.write("removing the lab (natedit stops and removes its rules, then every process "
              "by PID, the namespaces, the temp files) ... ")
    out.flush()
    t0 = time.monotonic()
    try:
        lab.teardown()
    except LabError as exc:
        out.write("incomplete\n")
        raise LabError(f"{exc}") from exc
    left = [ns for ns in lab.created_ns if os.path.exists(f"/run/netns/{ns}")]
    out.write(f"done ({time.monotonic() - t0:.1f} s){'' if not left else f'; LEFT: {left}'}\n")
    out.flush()
