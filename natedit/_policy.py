"""The policy: every tunable of the editor, with a built-in default for each.

A frozen value object. The core reads it; the edges load it from YAML
(:func:`load_policy`) and resolve what needs the host (the public address
of the default route's interface) before handing it to the core.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._errors import PolicyError

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

RFC1918 = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)


class Allocation(enum.Enum):
    RANDOM = "random"
    SEQUENTIAL = "sequential"


class MalformedAction(enum.Enum):
    DROP = "drop"
    """Drop the segment; the stream stays where it was (TCP retransmits it)."""
    PASS = "pass"
    """Pass it untouched, as the kernel helper does, and resynchronise later."""


class DisconnectRule(enum.Enum):
    CLIENT = "client"
    """Write the client's own (private) Call ID, as nf_nat_pptp does."""
    RFC = "rfc"
    """Leave the PAC's Call ID untouched; only map a public Call ID back."""


@dataclass(frozen=True, slots=True)
class Policy:
    public_address: IPv4Address | None = None
    """Address the clients share on the outside; None = that of the default route."""
    inside_networks: tuple[IPv4Network, ...] = RFC1918
    """Networks of the clients (the private side)."""
    queue_outbound: int = 1723
    """NFQUEUE number for inside -> outside packets."""
    queue_inbound: int = 1724
    """NFQUEUE number for outside -> inside packets."""
    call_id_first: int = 1
    """First public Call ID the allocator may hand out."""
    call_id_last: int = 65535
    """Last public Call ID the allocator may hand out."""
    allocation: Allocation = Allocation.RANDOM
    """random (default: a live ID is hard to guess) or sequential."""
    max_calls_per_client: int = 256
    """Live calls one private address may hold; more are refused."""
    max_calls: int = 65535
    """Live calls in all; more are refused."""
    max_control_connections: int = 16384
    """Tracked control connections in all; more are dropped (memory bound)."""
    request_timeout: float = 60.0
    """Seconds a call may wait for its Outgoing/Incoming-Call-Reply/Connected."""
    call_idle_timeout: float = 300.0
    """Seconds without GRE or control traffic after which a call is released."""
    control_idle_timeout: float = 300.0
    """Seconds without traffic after which a control connection is forgotten."""
    malformed: MalformedAction = MalformedAction.DROP
    """What a control message that fails validation gets."""
    disconnect_rule: DisconnectRule = DisconnectRule.CLIENT
    """What natedit writes into an inbound Call-Disconnect-Notify's Call ID."""
    metrics_listen: str = "127.0.0.1:9723"
    """host:port of the Prometheus endpoint (loopback by default)."""
    metrics_call_series: int = 10000
    """Most per-call series the mapping-table metric exports; the rest is counted."""
    log_level: str = "info"

    def with_public_address(self, address: IPv4Address) -> Policy:
        return dataclasses.replace(self, public_address=address)

    def is_inside(self, address: IPv4Address) -> bool:
        return any(address in net for net in self.inside_networks)


_ENUMS: dict[str, type[enum.Enum]] = {
    "allocation": Allocation,
    "malformed": MalformedAction,
    "disconnect_rule": DisconnectRule,
}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def policy_from_dict(data: Any, source: str = "<policy>") -> Policy:
    """Validate a mapping (as loaded from YAML) into a :class:`Policy`.

    Every problem is collected and reported together in a :class:`PolicyError`.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([f"{source}: expected a mapping at the top, found {type(data).__name__}"])
    problems: list[str] = []
    known = {f.name for f in dataclasses.fields(Policy)}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        where = f"{source}: {key}"
        if key not in known:
            problems.append(f"{where}: unknown key")
            continue
        try:
            values[key] = _convert(key, raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
    if not problems:
        try:
            policy = Policy(**values)
        except TypeError as exc:  # pragma: no cover - guarded by the key check
            raise PolicyError([f"{source}: {exc}"]) from exc
        problems.extend(f"{source}: {p}" for p in check_policy(policy))
        if not problems:
            return policy
    raise PolicyError(problems)


def _convert(key: str, raw: Any) -> Any:
    if key == "public_address":
        if raw is None:
            return None
        return IPv4Address(_expect(raw, str, "an IPv4 address"))
    if key == "inside_networks":
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"expected a non-empty list of networks, found {raw!r}")
        return tuple(IPv4Network(_expect(n, str, "a network like 10.0.0.0/8")) for n in raw)
    if key in _ENUMS:
        choices = [m.value for m in _ENUMS[key]]
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, found {raw!r}")
        return _ENUMS[key](raw)
    if key in ("request_timeout", "call_idle_timeout", "control_idle_timeout"):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise TypeError(f"expected seconds (a number), found {raw!r}")
        return float(raw)
    if key in ("metrics_listen",):
        return _expect(raw, str, "host:port")
    if key == "log_level":
        if raw not in _LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, found {raw!r}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError(f"expected an integer, found {raw!r}")
    return raw


def _expect(raw: Any, kind: type, what: str) -> Any:
    if not isinstance(raw, kind):
        raise TypeError(f"expected {what}, found {raw!r}")
    return raw


def check_policy(p: Policy) -> list[str]:
    """Cross-field checks; an empty list means the policy is usable."""
    problems = []
    for name in ("queue_outbound", "queue_inbound"):
        if not 0 <= getattr(p, name) <= 65535:
            problems.append(f"{name}: expected 0..65535, found {getattr(p, name)}")
    if p.queue_outbound == p.queue_inbound:
        problems.append("queue_inbound: must differ from queue_outbound")
    if not 0 <= p.call_id_first <= p.call_id_last <= 65535:
        problems.append(
            f"call_id_first..call_id_last: expected 0 <= first <= last <= 65535, "
            f"found {p.call_id_first}..{p.call_id_last}"
        )
    if p.metrics_call_series < 0:
        problems.append(f"metrics_call_series: expected 0 or more, found {p.metrics_call_series}")
    for name in ("max_calls_per_client", "max_calls", "max_control_connections"):
        if getattr(p, name) < 1:
            problems.append(f"{name}: expected at least 1, found {getattr(p, name)}")
    for name in ("request_timeout", "call_idle_timeout", "control_idle_timeout"):
        if getattr(p, name) <= 0:
            problems.append(f"{name}: expected seconds > 0, found {getattr(p, name)}")
    host, sep, port = p.metrics_listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"metrics_listen: expected host:port, found {p.metrics_listen!r}")
    return problems


def load_policy(path: str | Path | None) -> Policy:
    """The policy in ``path``, or the built-in default when ``path`` is None."""
    if path is None:
        return Policy()
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError([f"{path}: not valid YAML: {exc}"]) from exc
    return policy_from_dict(data, str(path))
