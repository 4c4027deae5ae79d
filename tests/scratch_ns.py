"""Throw-away network namespaces for the rules and worker tests.

Each namespace gets a unique per-run name (``ned-<pid>-<n>-<role>``), is
torn down at the end of its test, and nothing runs in the host's own
namespace. Lighter than ``natedit.lab``: no PPTP peers needed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from natedit import host
from tests.conftest import require, require_tool

_serial = itertools.count()


def require_scratch_ns() -> None:
    """Root and the tools these tests drive (see ``tests.conftest.require``)."""
    require(os.geteuid() == 0, "needs root for network namespaces and iptables")
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore", "nft"):
        require_tool(tool)


class Namespace:
    def __init__(self, role: str) -> None:
        self.name = f"ned-{os.getpid()}-{next(_serial)}-{role}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.sh("ip link set lo up")

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

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

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@contextmanager
def scratch_namespaces(*roles: str) -> Iterator[list[Namespace]]:
    made: list[Namespace] = []
    try:
        for role in roles:
            made.append(Namespace(role))
        yield made
    finally:
        for ns in made:
            ns.delete()


@contextmanager
def host_commands_in(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make natedit.host run its commands inside ``ns`` (this process stays outside)."""
    real_run = host.run

    def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
        return real_run(ns.argv(argv), stdin=stdin)

    with monkeypatch.context() as patch:
        patch.setattr(host, "run", run)
        yield
