"""The lab: N clients behind a gateway, one server, full cleanup.

Topology (:func:`lab_topology`; all names carry a per-run prefix, nothing is created
in the host namespace)::

    <p>-c1 eth0 10.0.0.11 -+
    <p>-c2 eth0 10.0.0.12 -+- <p>-gw br0 10.0.0.1/24
    ...                   -+        out0 198.51.100.1/24 --- <p>-srv eth0 198.51.100.2/24
                                    (ip_forward=1, default via 198.51.100.2)

A :class:`Lab` puts the rooms together: the namespaces (:mod:`.netns`), the
processes it starts (:mod:`.procs`), private mount namespaces for the peers
(:mod:`.mounts`) and the gateway's modes (:mod:`.gateway`). Everything it creates
is removed on exit, also after an exception: recorded processes (newest first,
each with its own stop signal), then every process still living in one of its
namespaces (killed by PID), the Call ID feeders, the namespaces, the syslog sink
and the temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .gateway import PPTP_PORT, Gateway
from .mounts import Mounts, PrivateMounts, SyslogSink, call_id_random_bytes
from .netns import Bridge, Netns, Port, Route, Scoped, Topology, Veth, raise_errors, unique_prefix
from .procs import LabError, Processes, Stream, which

__all__ = [
    "PPTP_PORT",
    "PUBLIC_GW_ADDR",
    "REQUIRED_COMMANDS",
    "SERVER_ADDR",
    "ClientNode",
    "Lab",
    "LabError",
    "PrivateMounts",
    "call_id_random_bytes",
    "lab_topology",
    "prerequisite_problems",
    "which",
]

PUBLIC_GW_ADDR = "198.51.100.1"
SERVER_ADDR = "198.51.100.2"
PUBLIC_PREFIXLEN = 24
INSIDE_GW_ADDR = "10.0.0.1"
INSIDE_PREFIXLEN = 24
FIRST_CLIENT_HOST = 11

GW_INSIDE_IF = "br0"
GW_OUTSIDE_IF = "out0"
NS_IF = "eth0"

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


@dataclass(frozen=True)
class ClientNode:
    index: int  # 0-based
    ns: str
    addr: str
    ifname: str
    bridge_port: str  # the veth end in the gateway namespace


def lab_topology(n_clients: int) -> Topology:
    """The lab's namespaces: gateway ``gw``, server ``srv``, clients ``c1``..``cN``."""
    clients = [f"c{i + 1}" for i in range(n_clients)]
    return Topology(
        nodes=("gw", "srv", *clients),
        bridges=(Bridge("gw", GW_INSIDE_IF, f"{INSIDE_GW_ADDR}/{INSIDE_PREFIXLEN}"),),
        links=(
            Veth(Port("gw", GW_OUTSIDE_IF, f"{PUBLIC_GW_ADDR}/{PUBLIC_PREFIXLEN}"),
                 Port("srv", NS_IF, f"{SERVER_ADDR}/{PUBLIC_PREFIXLEN}")),
            *(Veth(Port("gw", f"p{i + 1}", bridge=GW_INSIDE_IF),
                   Port(c, NS_IF, f"10.0.0.{FIRST_CLIENT_HOST + i}/{INSIDE_PREFIXLEN}"))
              for i, c in enumerate(clients)),
        ),
        routes=(Route("gw", "default", SERVER_ADDR),
                *(Route(c, "default", INSIDE_GW_ADDR) for c in clients)),
        forwarding=("gw",),
    )


@dataclass
class Lab(Scoped):
    """The namespace lab. Use as a context manager: ``with Lab(3) as lab: ...``.

    ``extra`` adds to :func:`lab_topology` (more nodes, links, addresses, routes);
    ``lab.node(name)`` is a node's namespace, ``lab.gateway_of(name)`` the modes of
    another gateway node. An inside server behind the gateway, say::

        INSIDE_SERVER = Topology(
            nodes=("isrv",),
            links=(Veth(Port("gw", "pisrv", bridge="br0"), Port("isrv", "eth0", "10.0.0.50/24")),),
            routes=(Route("isrv", "default", "10.0.0.1"),),
        )
        with Lab(2, extra=INSIDE_SERVER) as lab:
            lab.exec(lab.node("isrv"), [...])
    """

    n_clients: int
    prefix: str | None = None
    keep_tmp: bool = False
    extra: Topology = field(default_factory=lambda: Topology(nodes=()))
    net: Netns = field(init=False)
    gateway: Gateway = field(init=False)
    gw_ns: str = field(init=False)
    server_ns: str = field(init=False)
    clients: list[ClientNode] = field(init=False, default_factory=list)
    tmpdir: Path = field(init=False)
    syslog: SyslogSink = field(init=False)
    procs: Processes = field(init=False)
    mounts: Mounts = field(init=False)
    _gateways: dict[str, Gateway] = field(init=False, default_factory=dict)
    _torn_down: bool = field(init=False, default=False)
    _serial: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.n_clients < 1 or self.n_clients > 200:
            raise ValueError("n_clients must be within 1..200")
        if self.prefix is None:
            self.prefix = unique_prefix()
        self.net = Netns(lab_topology(self.n_clients) + self.extra, self.prefix)
        self.gw_ns = self.node("gw")
        self.server_ns = self.node("srv")
        for i in range(self.n_clients):
            self.clients.append(
                ClientNode(
                    index=i,
                    ns=self.node(f"c{i + 1}"),
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

    def build(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        os.chmod(self.tmpdir, 0o755)
        self.procs = Processes(self.tmpdir)
        self.gateway = self.gateway_of("gw")
        self.syslog = SyslogSink(self.tmpdir / "log")
        self.mounts = Mounts(self.tmpdir, self.procs, self.net, self.syslog)
        self.net.build()

    def teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        errors = self.procs.stop_all() if hasattr(self, "procs") else []
        errors += self.net.remove()
        if hasattr(self, "mounts"):
            self.mounts.close()
        if hasattr(self, "syslog"):
            self.syslog.close()
        if not hasattr(self, "tmpdir") and not self.keep_tmp:
            # a signal between mkdtemp and the assignment (seen once under SIGINT): the
            # directory carries this lab's unique prefix, and nothing is in it yet
            for left in Path(tempfile.gettempdir()).glob(f"{self.prefix}-*"):
                with contextlib.suppress(OSError):
                    left.rmdir()
        if hasattr(self, "tmpdir") and not self.keep_tmp:
            mounted = [p for p in self.tmpdir.rglob("*") if p.is_dir() and os.path.ismount(p)]
            if mounted:
                errors.append(f"not removing {self.tmpdir}: mounts below it: {mounted}")
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        raise_errors(errors)

    # ------------------------------------------------------------------ shorthands

    @property
    def namespaces(self) -> list[str]:
        return self.net.names

    @property
    def created_ns(self) -> list[str]:
        return self.net.created

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

    def node(self, name: str) -> str:
        """The namespace of node ``name`` (``gw``, ``srv``, ``c1``.., or one of ``extra``)."""
        return self.net.name(name)

    def pids_in(self, ns: str) -> set[int]:
        """Live PIDs in one of the lab's network namespaces."""
        return self.net.pids_in(ns)

    def exec(
        self, ns: str, argv: Sequence[str], **options: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in one of the lab's namespaces (:meth:`Netns.exec`)."""
        return self.net.exec(ns, argv, **options)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.exec(ns, ["sysctl", "-qw", f"{key}={value}"])

    def popen(
        self,
        ns: str | None,
        argv: Sequence[str],
        *,
        raw_argv: bool = False,
        stdout: Stream = None,
        stderr: int | IO[Any] | None = None,
        **options: Any,
    ) -> subprocess.Popen[bytes]:
        """Start a process in a lab namespace and record it for cleanup.

        Unless stdout/stderr are given, both go to a log file in the lab dir
        (``lab.process_log(proc)``). ``raw_argv`` runs argv as given (it must already
        enter a lab namespace, e.g. through ``PrivateMounts.argv``). The other options
        are :meth:`Processes.popen`'s.
        """
        full = list(argv) if raw_argv or ns is None else self.net.argv(ns, argv)
        return self.procs.popen(full, stdout=stdout, stderr=stderr, **options)

    def process_log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.procs.log(proc)

    def stop_process(
        self, proc: subprocess.Popen[bytes], sig: int | None = None, timeout: float | None = None
    ) -> int | None:
        """Stop one recorded process by PID (signal, wait, then SIGKILL). Returns its status."""
        return self.procs.stop(proc, sig, timeout)

    def private_mounts(
        self, ns: str, name: str, *, forced_call_id: int | Sequence[int] | None = None
    ) -> PrivateMounts:
        """A private mount namespace in ``ns`` (see :meth:`Mounts.private`)."""
        return self.mounts.private(ns, name, forced_call_id=forced_call_id)

    # the gateway's modes (see natedit.lab.gateway)

    def gateway_of(self, node: str, outside_if: str = GW_OUTSIDE_IF) -> Gateway:
        """The modes of a gateway node, made once (``lab.gateway`` is node ``gw``'s)."""
        if node not in self._gateways:
            self._gateways[node] = Gateway(self.node(node), outside_if, self.net, self.procs)
        return self._gateways[node]

    @property
    def gateway_processes(self) -> list[subprocess.Popen[bytes]]:
        return self.gateway.processes

    def iptables(self, *args: str) -> str:
        return self.gateway.iptables(*args)

    def gateway_masquerade_only(self) -> None:
        self.gateway.masquerade_only()

    def gateway_kernel_helper(self) -> None:
        self.gateway.kernel_helper()

    def start_gateway_process(
        self, argv: Sequence[str], *, ready: Callable[[], bool] | None = None, **options: Any
    ) -> subprocess.Popen[bytes]:
        return self.gateway.start_process(argv, ready=ready, **options)

    def conntrack(self, *args: str) -> str:
        return self.gateway.conntrack(*args)

    def ruleset(self) -> str:
        return self.gateway.ruleset()
