"""Throw-away network namespaces for the rules and worker tests.

Built by :mod:`natedit.lab.netns`, the one namespace builder: each
namespace is named ``ned<pid><hex>-<role>`` (a unique per-run prefix), is
torn down at the end of its test with every process still living in it,
and nothing runs in the host's own namespace. Lighter than
``natedit.lab``'s Lab: no PPTP peers, no private mounts.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from natedit import host
from natedit.lab.netns import Netns, Port, Route, Topology, Veth, unique_prefix
from tests.conftest import require, require_tool

LONE_GATEWAY = Topology(
    nodes=("gw",),
    links=(Veth(Port("gw", "out0", "198.51.100.1/24"), Port("gw", "out1")),),
    routes=(Route("gw", "default", "198.51.100.2"),),
)
"""A gateway namespace with a public address and a default route (nobody behind it)."""


def require_scratch_ns() -> None:
    """Root and the tools these tests drive (see ``tests.conftest.require``)."""
    require(os.geteuid() == 0, "needs root for network namespaces and iptables")
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore", "nft", "ethtool"):
        require_tool(tool)


class Namespace:
    """One node of a scratch topology, with the commands the tests run in it."""

    def __init__(self, net: Netns, role: str) -> None:
        self.net = net
        self.name = net.name(role)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return self.net.argv(self.name, argv)

    def run(self, argv: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str:
        done = subprocess.run(
            self.argv(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def sh(self, command: str, *, check: bool = True) -> str:
        return self.run(["sh", "-c", command], check=check)

    def iptables_save(self) -> str:
        """iptables-save without its timestamped comment lines."""
        text = self.run(["iptables-save"])
        return "".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("#"))


@contextmanager
def scratch_namespaces(
    *roles: str, topology: Topology | None = None
) -> Iterator[list[Namespace]]:
    """One namespace per role, or per node of ``topology`` (built with its links,
    addresses and routes)."""
    wanted = Topology(nodes=roles) + (topology or Topology(nodes=()))
    with Netns(wanted, unique_prefix("ned")) as net:
        yield [Namespace(net, role) for role in roles or wanted.nodes]


@contextmanager
def host_commands_in(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make natedit.host run its commands inside ``ns`` (this process stays outside)."""
    real_run = host.run

    def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
        return real_run(ns.argv(argv), stdin=stdin)

    with monkeypatch.context() as patch:
        patch.setattr(host, "run", run)
        yield
