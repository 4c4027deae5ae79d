"""End-to-end scenarios, reusable against any gateway (kernel helper, natedit, ...).

Each scenario builds a fresh Lab, lets ``gateway.setup(lab)`` configure the gateway
namespace (iptables rules, a worker process started with ``lab.start_gateway_process``),
starts pptpd and pptp-linux clients, pumps frames, captures the gateway's outside
interface, tears everything down, and returns a :class:`ScenarioResult`. Scenarios do not
assert: the caller decides what the gateway under test must achieve.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from natedit.lab.netns import Topology
from natedit.lab.peers import (
    PptpClient,
    PptpServer,
    StandinInfo,
    start_pptp_client,
    start_pptpd,
)
from natedit.lab.pump import FramePump
from natedit.lab.topology import Lab

from .capture import CCRQ, CDN, OCRP, OCRQ, STOPCCRQ, Capture, WireSummary

if TYPE_CHECKING:  # pac.py is imported lazily: it is also run as `python -m tests.harness.pac`
    from .pac import PacServer

ServerKind = Literal["pptpd", "pac"]
REPO = Path(__file__).resolve().parents[2]
"""This checkout: natedit runs from it (``python -m natedit`` finds its cwd's first)."""

HELLO_TIMEOUT = 6.0  # pptp-linux waits 1 s after starting its call manager
RETURN_TIMEOUT = 3.0
LINGER = 0.2  # extra listening for late or misdelivered frames


@dataclass(frozen=True)
class Gateway:
    """What the gateway does: a name for reports and a setup step run on a fresh Lab.

    ``setup`` runs after the topology exists and before any PPTP traffic; it may install
    rules and start processes (``lab.start_gateway_process``), which the Lab stops at exit.
    """

    name: str
    setup: Callable[[Lab], object]


KERNEL_HELPER = Gateway("kernel-helper", Lab.gateway_kernel_helper)
MASQUERADE_ONLY = Gateway("masquerade-only", Lab.gateway_masquerade_only)


def worker_gateway(
    name: str,
    argv: Callable[[Lab, Path], Sequence[str]],
    *,
    base: Callable[[Lab], object] = Lab.gateway_masquerade_only,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 10.0,
    grace: float = 5.0,
) -> Gateway:
    """A gateway made of ``base`` rules plus a worker process in the gateway namespace.

    ``argv(lab, ready_file)`` builds the command line (write any config into
    ``lab.tmpdir``); the scenario starts only once ``ready_file`` exists. For natedit::

        NATEDIT = worker_gateway(
            "natedit",
            lambda lab, ready: [
                sys.executable, "-m", "natedit", "run",
                "--policy", str(write_policy(lab)), "--ready-file", str(ready),
            ],
            cwd=str(REPO_ROOT),
        )

    The worker gets SIGTERM at teardown and ``grace`` seconds before SIGKILL; whether it
    was still running at the end is in ``ScenarioResult.gateway_alive``.
    """

    def setup(lab: Lab) -> None:
        base(lab)
        ready_file = lab.tmpdir / f"{name}.ready"
        lab.start_gateway_process(
            argv(lab, ready_file),
            ready=ready_file.exists,
            timeout=timeout,
            env=env,
            cwd=cwd,
            name=name,
            grace=grace,
        )

    return Gateway(name, setup)


@dataclass(frozen=True)
class PhaseStats:
    sent: int
    returned: int

    @property
    def complete(self) -> bool:
        return self.returned == self.sent


@dataclass
class CallResult:
    """One call (one pptp process): what it sent and got back."""

    key: int
    client: int  # client namespace index, 0-based
    client_addr: str
    forced_call_id: int | None
    sent: int
    received: int
    foreign: int
    foreign_from: dict[int, int]
    duplicates: int
    corrupt: int
    other: int
    bad_fcs: int
    connected: bool  # the server stand-in's hello frame arrived
    server_call: StandinInfo | None
    eof: bool  # pptp closed the PPP descriptor
    pptp_returncode: int | None  # None: still running at the end
    phases: dict[str, PhaseStats] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        return self.sent - self.received

    @property
    def clean(self) -> bool:
        """Connected, every frame back, nothing foreign, corrupt or duplicated."""
        return (
            self.connected
            and self.sent > 0
            and self.received == self.sent
            and self.foreign == 0
            and self.corrupt == 0
            and self.duplicates == 0
        )

    def line(self) -> str:
        phases = " ".join(f"{n}={p.returned}/{p.sent}" for n, p in self.phases.items())
        forced = f"{self.forced_call_id:#06x}" if self.forced_call_id is not None else "random"
        return (
            f"call key={self.key} c{self.client + 1} {self.client_addr} forced={forced} "
            f"connected={self.connected} sent={self.sent} received={self.received} "
            f"foreign={self.foreign}{self.foreign_from or ''} dup={self.duplicates} "
            f"corrupt={self.corrupt} other={self.other} bad_fcs={self.bad_fcs} eof={self.eof} "
            f"rc={self.pptp_returncode} [{phases}]"
        )



def natedit_gateway(name: str, policy: str | None = None, *, state: bool = False) -> Gateway:
    """``natedit run`` of this checkout as the gateway (on MASQUERADE): ``policy`` the
    YAML text of its policy file (None: the built-in default), its pid file
    ``natedit.pid`` in ``lab.tmpdir``; ``state``: a state file there too (else none)."""

    def argv(lab: Lab, ready: Path) -> list[str]:
        tmp = lab.tmpdir
        args = [sys.executable, "-m", "natedit", "run", "--ready-file", str(ready),
                "--pid-file", str(tmp / "natedit.pid"),
                "--state", str(tmp / "state.db") if state else ""]
        if policy is not None:
            path = tmp / f"{name}.yaml"
            path.write_text(policy)
            args += ["--policy", str(path)]
        return args

    return worker_gateway(name, argv, cwd=str(REPO))

@dataclass
class GatewayProcess:
    name: str
    pid: int
    returncode: int | None  # None: still running when the scenario ended
    log_tail: str


@dataclass
class ScenarioResult:
    scenario: str
    gateway: str
    prefix: str
    duration: float
    calls: dict[int, CallResult]
    wire: WireSummary
    outcome: dict[str, Any]
    conntrack: str
    gateway_processes: list[GatewayProcess]
    syslog: list[str]
    server: str = "pptpd"  # "pptpd" or "pac" (tests/harness/pac.py)
    server_log: list[str] = field(default_factory=list)  # the PAC's own log

    def call(self, key: int) -> CallResult:
        return self.calls[key]

    @property
    def total_foreign(self) -> int:
        return sum(c.foreign for c in self.calls.values())

    @property
    def gateway_alive(self) -> bool:
        """Every process started with lab.start_gateway_process still ran at the end."""
        return all(p.returncode is None for p in self.gateway_processes)

    def describe(self) -> str:
        lines = [
            f"scenario {self.scenario} via {self.gateway} against {self.server}"
            f" ({self.prefix}, {self.duration:.1f}s)"
        ]
        lines += [c.line() for c in self.calls.values()]
        lines += [f"outcome {k}: {v}" for k, v in self.outcome.items()]
        lines.append(self.wire.describe())
        for p in self.gateway_processes:
            lines.append(f"gateway process {p.name} pid={p.pid} rc={p.returncode}\n{p.log_tail}")
        lines.append("conntrack:\n" + self.conntrack.strip())
        lines.append("log tail:\n" + "\n".join(self.syslog[-40:]))
        if self.server_log:
            lines.append("PAC log tail:\n" + "\n".join(self.server_log[-40:]))
        return "\n".join(lines)


# --------------------------------------------------------------------------- plumbing


@dataclass
class Session:
    """A running scenario: lab, capture, server, pump and the calls started so far.

    ``server`` is pptpd (:class:`PptpServer`) unless the session was opened with
    ``server="pac"`` (:class:`~tests.harness.pac.PacServer`).
    """

    lab: Lab
    gateway: Gateway
    capture: Capture
    server: PptpServer | PacServer
    pump: FramePump
    calls: dict[int, PptpClient] = field(default_factory=dict)
    phases: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    addresses: dict[int, str] = field(default_factory=dict)
    """Per call key, the caller's address when it is not one of the lab's clients."""

    def start_call(
        self,
        client: int,
        *,
        forced_call_id: int | Sequence[int] | None = None,
        share_with: PptpClient | None = None,
        key: int | None = None,
        node: str | None = None,
        server: str | None = None,
        address: str | None = None,
    ) -> PptpClient:
        """Start a call of lab client ``client``; or, with ``node`` (and its ``address``,
        for the report), of another node, calling ``server`` (default: the lab's)."""
        call = start_pptp_client(
            self.lab, client, forced_call_id=forced_call_id, share_with=share_with, key=key,
            node=node, server=server or self.lab.server_addr,
        )
        if address is not None:
            self.addresses[call.key] = address
        self.calls[call.key] = call
        self.pump.add(call.key, call.sock)
        return call

    @property
    def pptpd(self) -> PptpServer:
        """The server, when it is pptpd (scenarios that end calls through its processes)."""
        if not isinstance(self.server, PptpServer):
            raise TypeError("this scenario needs pptpd as the server")
        return self.server

    def wait_connected(self, keys: Sequence[int], timeout: float = HELLO_TIMEOUT) -> bool:
        """Wait until each call got the server's hello (or its pptp hung up)."""
        st = self.pump.stats
        self.pump.wait_until(lambda: all(st[k].hellos or st[k].eof for k in keys), timeout)
        return all(st[k].hellos for k in keys)

    def phase(
        self, name: str, keys: Sequence[int], frames: int, timeout: float = RETURN_TIMEOUT
    ) -> bool:
        """Send ``frames`` per call, wait for the echoes.

        True only if every call could send all its frames and every one came back.
        """
        live = [k for k in keys if not self.pump.stats[k].eof]
        sent = self.pump.send_round(live, frames)
        for k in keys:
            sent.setdefault(k, [])
        self.phases[name] = sent
        self.pump.wait_returned(live, timeout)
        st = self.pump.stats
        return all(len(sent[k]) == frames and set(sent[k]) <= st[k].returned for k in keys)

    def finish(self, scenario: str, outcome: dict[str, Any]) -> ScenarioResult:
        self.pump.linger(LINGER)
        lab = self.lab
        conntrack = lab.conntrack("-L")
        wire = self.capture.stop()
        calls: dict[int, CallResult] = {}
        for key, call in self.calls.items():
            st = self.pump.stats[key]
            phases = {
                name: PhaseStats(len(sent[key]), len(set(sent[key]) & st.returned))
                for name, sent in self.phases.items()
                if key in sent
            }
            calls[key] = CallResult(
                key=key,
                client=call.index,
                client_addr=self.addresses.get(key) or lab.clients[call.index].addr,
                forced_call_id=call.forced_call_id,
                sent=st.sent,
                received=st.received,
                foreign=st.foreign,
                foreign_from=dict(st.foreign_from),
                duplicates=st.duplicates,
                corrupt=st.corrupt,
                other=st.other,
                bad_fcs=st.bad_fcs,
                connected=bool(st.hellos),
                server_call=st.hello,
                eof=st.eof,
                pptp_returncode=call.proc.poll(),
                phases=phases,
            )
        gw_procs = [
            GatewayProcess(
                name=f"gateway[{i}]",
                pid=p.pid,
                returncode=p.poll(),
                log_tail=lab.process_log(p)[-50000:],
            )
            for i, p in enumerate(lab.gateway_processes)
        ]
        syslog = [
            line
            for line in lab.syslog.lines()
            if "accepting packet" not in line and "GRE: " not in line
        ]
        return ScenarioResult(
            scenario=scenario,
            gateway=self.gateway.name,
            prefix=lab.prefix or "",
            duration=time.monotonic() - self.started,
            calls=calls,
            wire=wire,
            outcome=outcome,
            conntrack=conntrack,
            gateway_processes=gw_procs,
            syslog=syslog,
            server="pptpd" if isinstance(self.server, PptpServer) else "pac",
            server_log=[] if isinstance(self.server, PptpServer) else self.server.log_lines(),
        )


@contextmanager
def session(
    gateway: Gateway, n_clients: int, prefix: str | None = None, server: ServerKind = "pptpd",
    extra: Topology | None = None,
) -> Iterator[Session]:
    """Lab + gateway setup + outside capture + server; everything removed on exit.

    ``server``: "pptpd" (the real one, one call per control connection) or "pac" (the
    Python PAC of tests/harness/pac.py: every Outgoing-Call-Request gets its own call).
    """
    started = time.monotonic()
    with Lab(n_clients, prefix=prefix, extra=extra or Topology(nodes=())) as lab:
        gateway.setup(lab)
        capture = Capture(lab).start()
        running: PptpServer | PacServer
        if server == "pptpd":
            running = start_pptpd(lab)
        elif server == "pac":
            from .pac import start_pac

            running = start_pac(lab)
        else:
            raise ValueError(f"unknown server {server!r}")
        pump = FramePump()
        try:
            yield Session(lab, gateway, capture, running, pump, started=started)
        finally:
            pump.close()


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _ids(messages: Sequence[Any], attr: str) -> list[int | None]:
    return [getattr(m, attr) for m in messages]


# --------------------------------------------------------------------------- scenarios


def same_call_id(
    gateway: Gateway,
    *,
    n_clients: int = 3,
    call_id: int = 0x1234,
    frames: int = 40,
    prefix: str | None = None,
) -> ScenarioResult:
    """(a) n clients, all forced to the same private Call ID, one server, frames on all.

    Success: every call connected, every frame back to its sender, none to another.
    """
    with session(gateway, n_clients, prefix) as s:
        keys = list(range(n_clients))
        for i in keys:
            s.start_call(i, forced_call_id=call_id)
        connected = s.wait_connected(keys)
        all_returned = s.phase("burst", keys, frames)
        wire_outcome: dict[str, Any] = {"all_connected": connected, "all_returned": all_returned}
        result = s.finish("same_call_id", wire_outcome)
    w = result.wire
    result.outcome.update(
        ocrq_call_ids_outside=_ids(w.messages(OCRQ), "call_id"),
        ocrp_server_call_ids=_ids(w.messages(OCRP), "call_id"),
        ocrp_results=_ids(w.messages(OCRP), "result"),
        public_call_ids=sorted(w.gre_call_ids_from_server),
        server_call_ids=sorted(w.gre_call_ids_to_server),
        icmp_unreachable_for_gre=w.icmp_unreachable_for_gre,
    )
    return result


def teardown_mid_stream(
    gateway: Gateway,
    *,
    n_clients: int = 5,
    victim: int = 2,
    call_id: int = 0x1234,
    frames: int = 30,
    sig: int = signal.SIGTERM,
    prefix: str | None = None,
) -> ScenarioResult:
    """(b) n clients (same Call ID) flowing; the victim's pptp is killed by PID between
    two bursts; the others send a second burst.

    Success: "before" complete for everyone, "after" complete for the survivors, no
    foreign frames anywhere.
    """
    with session(gateway, n_clients, prefix) as s:
        keys = list(range(n_clients))
        survivors = [k for k in keys if k != victim]
        for i in keys:
            s.start_call(i, forced_call_id=call_id)
        connected = s.wait_connected(keys)
        before_ok = s.phase("before", keys, frames)
        victim_call = s.calls[victim]
        call_managers = victim_call.call_manager_pids()
        victim_rc = victim_call.kill(sig)
        cm_gone = _wait(lambda: not victim_call.call_manager_pids(), 3.0)
        after_ok = s.phase("after", survivors, frames)
        result = s.finish(
            "teardown_mid_stream",
            {
                "all_connected": connected,
                "before_all_returned": before_ok,
                "after_survivors_returned": after_ok,
                "victim": victim,
                "victim_signal": signal.Signals(sig).name,
                "victim_pptp_returncode": victim_rc,
                "victim_call_manager_pids": sorted(call_managers),
                "victim_call_manager_exited": cm_gone,
            },
        )
    w = result.wire
    result.outcome.update(
        call_clear_requests=len(w.messages(CCRQ)),
        call_clear_request_ids_outside=_ids(w.messages(CCRQ), "call_id"),
        public_call_ids=sorted(w.gre_call_ids_from_server),
    )
    return result


_CDN_RE = re.compile(r"Call disconnect notification received \(call id (\d+)\)")


def server_ends_call(
    gateway: Gateway,
    *,
    n_clients: int = 3,
    victim: int = 1,
    how: str = "pptpctrl",
    call_id: int = 0x1234,
    frames: int = 30,
    prefix: str | None = None,
) -> ScenarioResult:
    """(d) the server ends one call between two bursts; the other calls keep flowing.

    ``how``: "pptpctrl" (SIGTERM to the call's pptpctrl: it sends Call-Disconnect-Notify
    with its own Call ID, then Stop-Control-Connection-Request), "standin" (the "pppd"
    exits: pptpctrl just closes TCP, no CDN), or "pptpd" (SIGTERM to the pptpd manager:
    established calls are NOT ended, their pptpctrl processes live on).
    """
    with session(gateway, n_clients, prefix) as s:
        keys = list(range(n_clients))
        survivors = [k for k in keys if k != victim]
        for i in keys:
            s.start_call(i, forced_call_id=call_id)
        connected = s.wait_connected(keys)
        before_ok = s.phase("before", keys, frames)
        victim_call = s.calls[victim]
        hello = s.pump.stats[victim].hello
        t0 = time.monotonic()
        if how == "pptpd":
            s.pptpd.stop()
        elif hello is None:
            raise RuntimeError("victim call never connected; cannot end it from the server")
        else:
            s.pptpd.end_call(hello, how)
        victim_hung_up = s.pump.wait_until(lambda: s.pump.stats[victim].eof, 3.0)
        hangup_time = time.monotonic() - t0 if victim_hung_up else None
        pptp_exited = _wait(lambda: not victim_call.alive(), 2.0)
        after_ok = s.phase("after", survivors, frames)
        result = s.finish(
            "server_ends_call",
            {
                "how": how,
                "all_connected": connected,
                "before_all_returned": before_ok,
                "after_survivors_returned": after_ok,
                "victim": victim,
                "victim_server_call": hello,
                "victim_hung_up": victim_hung_up,
                "victim_hangup_seconds": hangup_time,
                "victim_pptp_exited": pptp_exited,
            },
        )
    w = result.wire
    tag = f"c{victim + 1}k{victim} "
    received_cdn = [
        int(m.group(1))
        for line in result.syslog
        if tag in line
        for m in [_CDN_RE.search(line)]
        if m
    ]
    result.outcome.update(
        cdn_call_ids_outside=_ids(w.messages(CDN), "call_id"),
        cdn_results=_ids(w.messages(CDN), "result"),
        cdn_call_ids_received_by_client=received_cdn,
        stop_control_requests=len(w.messages(STOPCCRQ)),
        call_clear_requests=len(w.messages(CCRQ)),
        ocrp_server_call_ids=_ids(w.messages(OCRP), "call_id"),
    )
    return result


def two_calls_one_control(
    gateway: Gateway,
    *,
    call_ids: tuple[int, int] = (0x1234, 0x1235),
    frames: int = 20,
    second_call_timeout: float = 2.0,
    return_timeout: float = 1.5,
    prefix: str | None = None,
    server: ServerKind = "pptpd",
) -> ScenarioResult:
    """(c) two pptp invocations in one client namespace sharing one /run: the second joins
    the first one's call manager, so both calls run on ONE control connection.

    The private Call IDs are forced through a FIFO (distinct IDs; a plain file would give
    both calls the same ID).

    ``server="pac"`` runs the Python PAC (tests/harness/pac.py) instead of pptpd: it
    answers both Outgoing-Call-Requests with calls of their own (Call IDs 0 and 128) and
    echoes each call's frames within that call, so both calls can be clean; there a NAT
    that supports several calls per control connection must show both calls connected
    and clean and ``distinct_public_call_ids``. ``outcome["pac_calls"]`` lists the
    PAC's calls as (connection, own Call ID, Peer's Call ID).

    The default server, pptpd, supports ONE call per control connection: on the second
    Outgoing-Call-Request it answers (Call ID 1, result 1), kills the first call's "pppd"
    and starts a new one for the second call ("Request to open call when call is already
    open", see ``outcome["server_replaced_first_call"]``); from then on it only echoes GRE
    carrying Call ID 1, toward the second call's public Call ID. So against pptpd even a
    perfect NAT cannot make both calls work. What a NAT that supports several calls per
    control connection should show against pptpd: two distinct public Call IDs in the two
    Outgoing-Call-Requests (``distinct_public_call_ids``), the second call connected and
    clean (its own frames back, nothing foreign), the first call receiving no foreign
    frames. The kernel helper instead gives both calls the same public Call ID (the TCP
    port), so the server's GRE for call 2 is delivered to call 1.
    """
    with session(gateway, 1, prefix, server) as s:
        first = s.start_call(0, forced_call_id=list(call_ids), key=0)
        first_connected = s.wait_connected([0])
        second = s.start_call(0, share_with=first, key=1)
        second_connected = s.wait_connected([1], second_call_timeout)
        call_managers = first.call_manager_pids() | second.call_manager_pids()
        both_ok = s.phase("both", [0, 1], frames, return_timeout)
        served = list(first.mounts.feeder.served) if first.mounts.feeder else []
        pac_calls = (
            []
            if isinstance(s.server, PptpServer)
            else [(c.conn, c.call_id, c.peer_call_id) for c in s.server.calls()]
        )
        result = s.finish(
            "two_calls_one_control",
            {
                "first_call_connected": first_connected,
                "second_call_connected": second_connected,
                "both_returned": both_ok,
                "call_manager_count": len(call_managers),
                "private_call_ids_served": served,
                "pac_calls": pac_calls,
            },
        )
    w = result.wire
    ocrq_ids = _ids(w.messages(OCRQ), "call_id")
    result.outcome.update(
        control_connections=len(w.control_connections),
        ocrq_call_ids_outside=ocrq_ids,
        distinct_public_call_ids=len(set(ocrq_ids)) == len(ocrq_ids) == 2,
        ocrp_server_call_ids=_ids(w.messages(OCRP), "call_id"),
        ocrp_peer_call_ids=_ids(w.messages(OCRP), "peer_call_id"),
        ocrp_results=_ids(w.messages(OCRP), "result"),
        public_call_ids=sorted(w.gre_call_ids_from_server),
        server_call_ids=sorted(w.gre_call_ids_to_server),
        server_replaced_first_call=any(
            "Request to open call when call is already open" in line for line in result.syslog
        ),
    )
    return result


SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "same_call_id": same_call_id,
    "teardown_mid_stream": teardown_mid_stream,
    "two_calls_one_control": two_calls_one_control,
    "server_ends_call": server_ends_call,
}
