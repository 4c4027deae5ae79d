"""The one namespace builder: a topology as data, built in fresh namespaces, torn down whole.

A :class:`Topology` says what to build: nodes (one network namespace each),
bridges, veth pairs (an address on each end, or a port of a bridge), extra
addresses, routes and the nodes that forward. :class:`Netns` builds it in
namespaces named ``<prefix>-<node>`` (a unique per-run prefix), runs commands
in them, and at teardown kills every process still living in one of them (by
PID, never its caller) and deletes them, which removes their links too.
Nothing is created in the host's own namespace. For example::

    ROUTER = Topology(
        nodes=("a", "gw", "b"),
        links=(Veth(Port("a", "eth0", "10.0.0.2/24"), Port("gw", "in0", "10.0.0.1/24")),
               Veth(Port("gw", "out0", "198.51.100.1/24"), Port("b", "eth0", "198.51.100.2/24"))),
        routes=(Route("a", "default", "10.0.0.1"),),
        forwarding=("gw",),
    )
    with Netns(ROUTER) as net:
        net.exec(net.name("a"), ["ping", "-c1", "198.51.100.2"])

Topologies add up (``LAB + Topology(nodes=("inside-server",), ...)``), so a
variant names only what it has more. Every veth end and bridge gets TX
offload off, so captured packets carry complete checksums.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from .procs import LabError, run


def unique_prefix(tag: str = "ne") -> str:
    """A per-run name prefix: ``tag``, this PID, 4 random hex digits."""
    return f"{tag}{os.getpid() % 100000:05d}{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Port:
    """One end of a veth pair: an interface of ``node`` with an address, or a bridge port."""

    node: str
    ifname: str
    address: str | None = None
    """``10.0.0.1/24``; None: no address."""
    bridge: str | None = None
    """Enslave the interface to this bridge of the same node."""


@dataclass(frozen=True)
class Veth:
    a: Port
    b: Port


@dataclass(frozen=True)
class Bridge:
    node: str
    name: str
    address: str | None = None


@dataclass(frozen=True)
class Address:
    """An extra address on an interface (e.g. a gateway's second public address)."""

    node: str
    ifname: str
    address: str


@dataclass(frozen=True)
class Route:
    node: str
    to: str
    """``default`` or a prefix."""
    via: str


@dataclass(frozen=True)
class Topology:
    nodes: tuple[str, ...]
    bridges: tuple[Bridge, ...] = ()
    links: tuple[Veth, ...] = ()
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    forwarding: tuple[str, ...] = ()
    """Nodes with net.ipv4.ip_forward=1."""

    def __add__(self, other: Topology) -> Topology:
        return Topology(
            nodes=self.nodes + tuple(n for n in other.nodes if n not in self.nodes),
            bridges=self.bridges + other.bridges,
            links=self.links + other.links,
            addresses=self.addresses + other.addresses,
            routes=self.routes + other.routes,
            forwarding=self.forwarding + other.forwarding,
        )

    def interfaces(self) -> Iterator[tuple[str, str]]:
        """(node, interface) of every veth end and bridge."""
        for bridge in self.bridges:
            yield bridge.node, bridge.name
        for link in self.links:
            yield link.a.node, link.a.ifname
            yield link.b.node, link.b.ifname


class Scoped:
    """``with thing: ...`` builds it and tears it down, also after an exception.

    A failed build is torn down before its exception goes on; a failed teardown
    raises LabError, or only warns when another exception is already on its way.
    """

    def build(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.build()
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
        try:
            self.teardown()
        except LabError as teardown_error:
            warnings.warn(str(teardown_error), RuntimeWarning, stacklevel=2)


def raise_errors(errors: Sequence[str]) -> None:
    """LabError naming everything a teardown could not remove (nothing: no error)."""
    if errors:
        raise LabError("lab teardown: " + "; ".join(errors))


@dataclass
class Netns(Scoped):
    """Builds one :class:`Topology`; use as a context manager, or ``build``/``teardown``."""

    topology: Topology
    prefix: str = field(default_factory=unique_prefix)
    created: list[str] = field(init=False, default_factory=list)
    """Namespaces made so far, in order."""
    _inodes: dict[str, tuple[int, int]] = field(init=False, default_factory=dict)

    def name(self, node: str) -> str:
        """The namespace of ``node``."""
        if node not in self.topology.nodes:
            raise LabError(f"{node!r} is not a node of this topology")
        return f"{self.prefix}-{node}"

    @property
    def names(self) -> list[str]:
        return [self.name(node) for node in self.topology.nodes]

    # ------------------------------------------------------------------ build, teardown

    def build(self) -> None:
        topo = self.topology
        for node in topo.nodes:
            ns = self.name(node)
            run(["ip", "netns", "add", ns])
            self.created.append(ns)
            st = os.stat(f"/run/netns/{ns}")
            self._inodes[ns] = (st.st_dev, st.st_ino)
            self.ip(node, "link", "set", "lo", "up")
        for bridge in topo.bridges:
            self.ip(bridge.node, "link", "add", bridge.name, "type", "bridge")
            if bridge.address:
                self.ip(bridge.node, "addr", "add", bridge.address, "dev", bridge.name)
            self.ip(bridge.node, "link", "set", bridge.name, "up")
        for link in topo.links:
            a, b = link.a, link.b
            self.ip(a.node, "link", "add", a.ifname, "type", "veth",
                    "peer", "name", b.ifname, "netns", self.name(b.node))
            for port in (a, b):
                if port.bridge:
                    self.ip(port.node, "link", "set", port.ifname, "master", port.bridge)
                if port.address:
                    self.ip(port.node, "addr", "add", port.address, "dev", port.ifname)
                self.ip(port.node, "link", "set", port.ifname, "up")
        for extra in topo.addresses:
            self.ip(extra.node, "addr", "add", extra.address, "dev", extra.ifname)
        for route in topo.routes:
            self.ip(route.node, "route", "add", route.to, "via", route.via)
        for node in topo.forwarding:
            self.exec(self.name(node), ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # TX offload off everywhere, so captured packets carry complete checksums.
        for node, dev in topo.interfaces():
            self.exec(self.name(node), ["ethtool", "-K", dev, "tx", "off"])

    def teardown(self) -> None:
        raise_errors(self.remove())

    def remove(self) -> list[str]:
        """Kill what still lives in our namespaces, delete them; what went wrong."""
        errors: list[str] = []
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and self.pids():
                time.sleep(0.01)
        leftover = self.pids()
        if leftover:
            errors.append(f"processes still in lab namespaces: {sorted(leftover)}")
        for ns in reversed(self.created):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if res.returncode != 0 and Path(f"/run/netns/{ns}").exists():
                errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        return errors

    # ------------------------------------------------------------------ commands

    def ip(self, node: str, *args: str) -> None:
        run(["ip", "-n", self.name(node), *args])

    def argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``ns`` (one of ours)."""
        if ns not in self._inodes:
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
        """Run a command to completion in namespace ``ns``."""
        res = run(self.argv(ns, argv), check=False, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise LabError(
                f"[{ns}] {' '.join(argv)} failed ({res.returncode}): "
                f"{res.stderr.strip() or res.stdout.strip()}"
            )
        return res

    # ------------------------------------------------------------------ processes inside

    def pids(self) -> set[int]:
        """Live PIDs whose network namespace is one of ours (never our own)."""
        return self._pids(set(self._inodes.values()))

    def pids_in(self, ns: str) -> set[int]:
        """Live PIDs in namespace ``ns``."""
        return self._pids({self._inodes[ns]})

    @staticmethod
    def _pids(wanted: set[tuple[int, int]]) -> set[int]:
        found: set[int] = set()
        if not wanted:
            return found
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                st = os.stat(f"/proc/{entry.name}/ns/net")
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted and stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]:
                found.add(int(entry.name))
        return found
