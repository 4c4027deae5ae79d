"""What natedit asks of the host: external commands, /proc, the default route.

The one module that runs subprocesses (``iptables-save``, ``iptables-restore``,
``nft``, ``ip``), so the rest can be read, and tested, as pure functions
over their text. Every failure becomes a :class:`HostError` with one line
saying which command failed and what it printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from . import NateditError, Policy


class HostError(NateditError):
    """The host could not do what natedit asked (a command failed, no route, ...)."""


def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run ``argv``, feed it ``stdin``, return its standard output.

    Raises :class:`HostError` with the command's first error line when it
    cannot be started or exits non-zero.
    """
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        # nft repeats "managed by iptables-nft" warnings before the real error.
        errors = [ln for ln in lines if not ln.startswith("# Warning")] or lines
        message = errors[0] if errors else f"exit status {done.returncode}"
        raise HostError(f"{' '.join(argv[:3])}: {message}")
    return done.stdout


def have(program: str) -> bool:
    return shutil.which(program) is not None


def read_text(path: str) -> str | None:
    """The content of ``path`` (a /proc or /sys file), or None when it does not exist."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


CAP_NET_ADMIN = 12
"""Firewall rules, netfilter queues (linux/capability.h)."""


def has_capability(bit: int, status: str | None = None) -> bool:
    """Whether this process has capability ``bit`` in its effective set.

    ``status`` is the text of /proc/self/status (read when None); without
    one (not Linux), being root is taken for having every capability.
    """
    text = status if status is not None else read_text("/proc/self/status")
    for line in (text or "").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return os.geteuid() == 0


def iptables_is_nft() -> bool:
    """True when ``iptables`` is iptables-nft (rules live in nft tables ``ip raw`` ...)."""
    return "nf_tables" in run(["iptables", "--version"])


def nft_ruleset(family: str | None = None) -> list[dict[str, Any]]:
    """``nft -j list ruleset [family]`` as its list of objects (tables, chains, rules, ...)."""
    argv = ["nft", "-j", "list", "ruleset"] + ([family] if family else [])
    data = json.loads(run(argv) or '{"nftables": []}')
    objects: list[dict[str, Any]] = data.get("nftables", [])
    return objects


def default_route_address() -> IPv4Address:
    """The address the host uses toward its IPv4 default route.

    The route's preferred source when it names one, otherwise the primary
    (first, not secondary) global IPv4 address of the route's interface.
    """
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "default"]) or "[]")
    route = pick_default_route(routes)
    if "prefsrc" in route:
        return IPv4Address(route["prefsrc"])
    dev = route["dev"]
    links = json.loads(run(["ip", "-j", "-4", "addr", "show", "dev", dev]) or "[]")
    return pick_primary_address(links, dev)


def interface_address(dev: str) -> IPv4Address:
    """The primary (first, not secondary) global IPv4 address of interface ``dev``."""
    links = json.loads(run(["ip", "-j", "-4", "addr", "show", "dev", dev]) or "[]")
    return pick_primary_address(links, dev)


def public_address(policy: Policy) -> IPv4Address:
    """The address a policy names as public: its own, its interface's, the default route's."""
    if policy.public_address is not None:
        return policy.public_address
    if policy.public_interface is not None:
        return interface_address(policy.public_interface)
    return default_route_address()


def pick_default_route(routes: list[dict[str, Any]]) -> dict[str, Any]:
    """The first (lowest metric: ``ip`` lists it first) default route that has a device."""
    for route in routes:
        if route.get("dst") == "default" and "dev" in route:
            return route
    raise HostError("no IPv4 default route: set public_address in the policy")


def pick_primary_address(links: list[dict[str, Any]], dev: str) -> IPv4Address:
    for link in links:
        for info in link.get("addr_info", []):
            if (
                info.get("family") == "inet"
                and info.get("scope") == "global"
                and not info.get("secondary", False)
            ):
                return IPv4Address(info["local"])
    raise HostError(f"device {dev} has no global IPv4 address")
