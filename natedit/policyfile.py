"""The YAML policy file: a line-numbered loader, its checks, dumps and diffs.

The YAML layout groups the fields (``limits:``, ``timeouts:``, ``acl:``,
...); the Python attribute names of :class:`~natedit.core.policy.Policy` stay
flat. :data:`FIELDS` is the one table between the two: YAML path, attribute,
what a valid value looks like. Validation works on the YAML node tree, so
every problem carries the line it comes from, and all of them are reported
together::

    policy.yaml:7: limits.max_calls_per_client: expected an integer from 1 to 65535, found 'many'
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from .core.errors import PolicyError
from .core.policy import (
    LOG_LEVELS,
    MAX_CALLS,
    MAX_CONTROL_CONNECTIONS,
    MAX_RATE,
    MAX_TIMEOUT,
    Allocation,
    Datapath,
    DisconnectRule,
    IPv4Address,
    IPv4Network,
    LogFormat,
    MalformedAction,
    Policy,
    WorkerDown,
)

# -- the bounds of a policy file -------------------------------------------------------------

MAX_BYTES = 256 * 1024
"""Largest policy file read (a real one is a few KiB); a larger one is refused unread."""
MAX_DEPTH = 16
"""Deepest nesting of mappings and lists composed (the layout needs 4)."""
MAX_NETWORKS = 1024
"""Most networks in one list (the ACL is searched for every new call)."""
MAX_NUMBER = 64
"""Most characters of a YAML integer or float converted (every numeric field has an
upper bound far below; a 5,000-digit integer is refused unconverted)."""
MAX_PROBLEMS = 50
"""Most problems listed (the rest is counted in one more line)."""
MAX_SHOWN = 60
"""Most characters of a value or key repeated in a message."""

# -- the schema ------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value is not what its field expects; ``expected`` completes "expected ..."."""

    def __init__(self, expected: str, detail: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Field:
    path: str
    """Where the value lives in the YAML document, dotted: ``limits.max_calls``."""
    attr: str
    """The :class:`Policy` attribute."""
    convert: Callable[[Any], Any]
    """Plain YAML value -> attribute value; raises _Mismatch."""
    restart: bool = False
    """True when a running worker cannot change it (a reload that tries is rejected)."""
    networks: bool = False
    """A list of networks: each item is checked, and located, on its own."""
    retired: bool = False
    """A key still accepted and checked, as it always was, that sets nothing (``attr``
    names no attribute): files that have it load; dumps and diffs leave it out."""
    plain: Callable[[Any], Any] | None = None
    """The attribute as a plain YAML value, when :func:`yaml_value` does not say it."""

    @property
    def default(self) -> Any:
        return getattr(_DEFAULT, self.attr)


def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    """An integer from ``lo`` to ``hi``: every numeric field has both bounds."""
    expected = f"an integer from {lo} to {hi}"

    def convert(raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _Mismatch(expected)
        if not lo <= raw <= hi:
            raise _Mismatch(expected)
        return raw

    return convert


def _number(expected: str, ok: Callable[[float], bool]) -> Callable[[Any], float]:
    def convert(raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _Mismatch(expected)
        value = float(raw)
        if not math.isfinite(value) or not ok(value):
            raise _Mismatch(expected)
        return value

    return convert


def _choice(kind: type[enum.Enum], hint: dict[str, str] | None = None) -> Callable[[Any], Any]:
    values = [m.value for m in kind]
    expected = f"one of {', '.join(values)}" if len(values) > 1 else values[0]

    def convert(raw: Any) -> Any:
        if raw not in values or isinstance(raw, bool):
            detail = (hint or {}).get(raw, "") if isinstance(raw, str) else ""
            raise _Mismatch(expected, detail)
        return kind(raw)

    return convert


def _log_level(raw: Any) -> str:
    if raw not in LOG_LEVELS:
        raise _Mismatch(f"one of {', '.join(LOG_LEVELS)}")
    return str(raw)


MAX_PUBLIC_ADDRESSES = 64
"""Most addresses ``public_address`` may list."""
_PUBLIC = (f"an IPv4 address, a list of 1 to {MAX_PUBLIC_ADDRESSES} different IPv4 "
           "addresses, or null")


def _public_addresses(raw: Any) -> tuple[IPv4Address, ...]:
    """``public_address``: one address, a list of them (several uplinks, an SNAT pool,
    per-network SNAT: each call gets the one its control connection was NATed to), or
    null (none: that of ``public_interface`` or of the default route)."""
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    if not 1 <= len(items) <= MAX_PUBLIC_ADDRESSES:
        raise _Mismatch(_PUBLIC)
    out: list[IPv4Address] = []
    for item in items:
        try:
            if not isinstance(item, str):
                raise ValueError
            address = IPv4Address(item)
        except ValueError:
            raise _Mismatch(_PUBLIC) from None
        if address in out:
            raise _Mismatch(_PUBLIC, f"{address} twice")
        out.append(address)
    return tuple(out)


def _plain_public(addresses: tuple[IPv4Address, ...]) -> Any:
    """null, one address, or the list: as the policy file says it."""
    if len(addresses) <= 1:
        return str(addresses[0]) if addresses else None
    return [str(a) for a in addresses]


_IFNAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,15}")


def _interface_or_null(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not _IFNAME.fullmatch(raw):
        raise _Mismatch("an interface name of 1 to 15 letters, digits or _.:@+- (or null)")
    return raw


_NETWORK = "an IPv4 network like 10.0.0.0/8"


def _network(raw: Any) -> IPv4Network:
    if not isinstance(raw, str):
        raise _Mismatch(_NETWORK)
    try:
        return IPv4Network(raw)
    except ValueError:
        try:
            IPv4Network(raw, strict=False)
        except ValueError:
            raise _Mismatch(_NETWORK) from None
        raise _Mismatch(_NETWORK, "host bits set") from None


def _networks(non_empty: bool) -> Callable[[Any], tuple[IPv4Network, ...]]:
    """A list of networks; items are converted (and located) one by one by the walker."""
    expected = (f"a non-empty list of at most {MAX_NETWORKS} IPv4 networks" if non_empty
                else f"a list of at most {MAX_NETWORKS} IPv4 networks")

    def convert(raw: Any) -> tuple[IPv4Network, ...]:
        if not isinstance(raw, list) or (non_empty and not raw) or len(raw) > MAX_NETWORKS:
            raise _Mismatch(expected)
        return tuple(_network(item) for item in raw)

    return convert


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_LISTEN = "host:port (an IPv4 address, [IPv6 address] or host name; a port from 1 to 65535)"


def _listen(raw: Any) -> str:
    if not isinstance(raw, str):
        raise _Mismatch(_LISTEN)
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Mismatch(_LISTEN)
    try:
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        elif not re.fullmatch(r"[0-9.]+", host):
            if not _HOSTNAME.fullmatch(host):
                raise ValueError(host)
        else:
            IPv4Address(host)
    except ValueError:
        raise _Mismatch(_LISTEN) from None
    return raw


class _Refuse(enum.Enum):
    """``refuse``'s one value: a refused call's segment is dropped, as it always is (TCP
    retransmits it and it is decided again). The key sets nothing; it stays accepted
    so that existing files load, and ``reply`` stays rejected with its reason."""

    DROP = "drop"


_REPLY_HINT = {
    "reply": "refusing with an Outgoing-Call-Reply is not supported, see the README",
}

SCHEMA: tuple[Field, ...] = (
    Field("public_address", "public_addresses", _public_addresses, restart=True,
          plain=_plain_public),
    Field("public_interface", "public_interface", _interface_or_null, restart=True),
    Field("inside_networks", "inside_networks", _networks(True), restart=True, networks=True),
    Field("queues.outbound", "queue_outbound", _integer(0, 65535), restart=True),
    Field("queues.inbound", "queue_inbound", _integer(0, 65535), restart=True),
    Field("call_ids.first", "call_id_first", _integer(0, 65535)),
    Field("call_ids.last", "call_id_last", _integer(0, 65535)),
    Field("call_ids.allocation", "allocation", _choice(Allocation)),
    Field("call_ids.node", "call_id_node", _integer(1, 16)),
    Field("call_ids.nodes", "call_id_nodes", _integer(1, 16)),
    Field("limits.max_calls_per_client", "max_calls_per_client", _integer(1, MAX_CALLS)),
    Field("limits.max_calls", "max_calls", _integer(1, MAX_CALLS)),
    Field("limits.max_control_connections", "max_control_connections",
          _integer(1, MAX_CONTROL_CONNECTIONS)),
    Field("limits.new_calls_per_second", "new_calls_per_second",
          _number(f"a number from 0 to {MAX_RATE:.0f} (0: no limit)",
                  lambda v: 0 <= v <= MAX_RATE)),
    Field("limits.new_calls_burst", "new_calls_burst", _integer(1, MAX_CALLS)),
    Field("timeouts.request", "request_timeout",
          _number(f"seconds, more than 0 and at most {MAX_TIMEOUT:.0f}",
                  lambda v: 0 < v <= MAX_TIMEOUT)),
    Field("timeouts.call_idle", "call_idle_timeout",
          _number(f"seconds, more than 0 and at most {MAX_TIMEOUT:.0f}",
                  lambda v: 0 < v <= MAX_TIMEOUT)),
    Field("timeouts.control_idle", "control_idle_timeout",
          _number(f"seconds, more than 0 and at most {MAX_TIMEOUT:.0f}",
                  lambda v: 0 < v <= MAX_TIMEOUT)),
    Field("acl.clients.allow", "clients_allow", _networks(False), networks=True),
    Field("acl.clients.deny", "clients_deny", _networks(False), networks=True),
    Field("acl.servers.allow", "servers_allow", _networks(False), networks=True),
    Field("acl.servers.deny", "servers_deny", _networks(False), networks=True),
    Field("refuse", "(refuse)", _choice(_Refuse, _REPLY_HINT), retired=True),
    Field("malformed", "malformed", _choice(MalformedAction)),
    Field("disconnect_rule", "disconnect_rule", _choice(DisconnectRule)),
    Field("datapath", "datapath", _choice(Datapath)),
    Field("on_worker_down", "on_worker_down", _choice(WorkerDown), restart=True),
    Field("metrics.listen", "metrics_listen", _listen, restart=True),
    Field("metrics.call_series", "metrics_call_series", _integer(0, 10_000_000)),
    Field("logging.level", "log_level", _log_level),
    Field("logging.format", "log_format", _choice(LogFormat)),
)
"""Every policy key, in the document's order: YAML path, Policy attribute, converter,
run-time changeable or not."""
FIELDS = tuple(f for f in SCHEMA if not f.retired)
"""The keys that set a :class:`Policy` attribute (all but the retired ``refuse``)."""

BY_PATH = {f.path: f for f in SCHEMA}
BY_ATTR = {f.attr: f for f in FIELDS}
_DEFAULT = Policy()


def _tree() -> dict[str, Any]:
    """The document layout: group name -> sub-layout, leaf name -> Field."""
    root: dict[str, Any] = {}
    for f in SCHEMA:
        *groups, leaf = f.path.split(".")
        node = root
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = f
    return root


LAYOUT = _tree()


# -- loading ---------------------------------------------------------------------------------

Lines = dict[str, int]
"""Key path (``acl.clients.deny[1]`` for list items) -> 1-based line in the file."""


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """A valid policy and where each of its keys was written (for later messages)."""

    policy: Policy
    source: str
    lines: Lines

    def where(self, path: str) -> str:
        """``source:line: path`` (``source: path`` for a key the file does not set)."""
        return _where(self.source, self.lines, path)


def _where(source: str, lines: Lines, path: str) -> str:
    line = lines.get(path)
    return f"{source}:{line}: {path}" if line is not None else f"{source}: {path}"


def _found(node: yaml.Node, value: Any) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(_clip(value))
    return _clip(str(value))


def _clip(text: str) -> str:
    """``text``, cut to MAX_SHOWN characters for a message."""
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"


class _Walker:
    """Walks the composed document against :data:`LAYOUT`, collecting every problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.values: dict[str, Any] = {}
        self.lines: Lines = {}
        self._problems: list[tuple[int, str]] = []
        self.bad: set[str] = set()
        """Attributes whose value was rejected: the cross-field checks skip them."""
        self._construct = _Constructor()

    def problem(self, path: str, message: str, line: int | None = None) -> None:
        if line is None:
            line = self.lines.get(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        self._problems.append((line or 0, text))

    @property
    def problems(self) -> list[str]:
        """Every problem so far, in the order of the file (the first MAX_PROBLEMS)."""
        texts = [text for _, text in sorted(self._problems, key=lambda p: p[0])]
        if len(texts) > MAX_PROBLEMS:
            more = len(texts) - MAX_PROBLEMS
            texts = [*texts[:MAX_PROBLEMS], f"{self.source}: and {more} more problems"]
        return texts

    def mismatch(self, path: str, node: yaml.Node, value: Any, exc: _Mismatch) -> None:
        detail = f" ({exc.detail})" if exc.detail else ""
        self.problem(path, f"expected {exc.expected}, found {_found(node, value)}{detail}",
                     node.start_mark.line + 1)

    def plain(self, node: yaml.Node) -> Any:
        return self._construct.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, layout: dict[str, Any], prefix: str) -> None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return  # an empty group: all its defaults
        if not isinstance(node, yaml.MappingNode):
            keys = ", ".join(layout)
            what = f"a mapping with the keys {keys}"
            self.problem(prefix, f"expected {what}, found {_found(node, self._scalar(node))}",
                         node.start_mark.line + 1)
            return
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = self._scalar(key_node)
            name = _clip(key if isinstance(key, str) else str(key))
            path = f"{prefix}.{name}" if prefix else name
            if name in seen:
                self.problem(path, f"duplicate key (first at line {seen[name]})", line)
                continue
            seen[name] = line
            entry = layout.get(name) if isinstance(key, str) else None
            if entry is None:
                self.problem(path, f"unknown key; {_suggest(name, prefix, layout)}", line)
            elif isinstance(entry, dict):
                self.lines[path] = line
                self.mapping(value_node, entry, path)
            else:
                self.lines[path] = line
                self.leaf(entry, value_node)

    def leaf(self, f: Field, node: yaml.Node) -> None:
        self.bad.add(f.attr)  # until it is converted
        try:
            raw = self.plain(node)
        except (yaml.YAMLError, ValueError) as exc:
            self.problem(f.path, f"not a plain YAML value: {_yaml_problem(exc)}",
                         node.start_mark.line + 1)
            return
        if f.networks and isinstance(node, yaml.SequenceNode):
            self.networks(f, node, raw)
            return
        try:
            self.values[f.attr] = f.convert(raw)
            self.bad.discard(f.attr)
        except _Mismatch as exc:
            self.mismatch(f.path, node, raw, exc)

    def networks(self, f: Field, node: yaml.SequenceNode, raw: list[Any]) -> None:
        """A list of networks, each item located on its own line."""
        if len(node.value) > MAX_NETWORKS:
            self.problem(f.path, f"expected at most {MAX_NETWORKS} networks, found "
                                 f"{len(node.value)}", node.start_mark.line + 1)
            return
        items: list[IPv4Network] = []
        ok = True
        for i, (item_node, item) in enumerate(zip(node.value, raw, strict=True)):
            path = f"{f.path}[{i}]"
            self.lines[path] = item_node.start_mark.line + 1
            try:
                items.append(_network(item))
            except _Mismatch as exc:
                self.mismatch(path, item_node, item, exc)
                ok = False
        if not items and ok:
            try:
                f.convert([])
            except _Mismatch as exc:
                self.mismatch(f.path, node, raw, exc)
                return
        if ok:
            self.values[f.attr] = tuple(items)
            self.bad.discard(f.attr)

    def _scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return None
        try:
            return self.plain(node)
        except (yaml.YAMLError, ValueError):
            return node.value


def _suggest(name: str, prefix: str, layout: dict[str, Any]) -> str:
    """What an unknown key probably meant."""
    legacy = BY_ATTR.get(name)
    if legacy is not None and legacy.path != name:
        return f"did you mean {legacy.path}?"
    close = difflib.get_close_matches(name, list(layout), n=1, cutoff=0.75)
    if close:
        return f"did you mean {f'{prefix}.' if prefix else ''}{close[0]}?"
    return f"expected one of: {', '.join(layout)}"


def _cross_checks(w: _Walker, p: Policy) -> None:
    """Problems between fields; each is reported on the line of the key set last."""

    def valid(*attrs: str) -> bool:
        return not w.bad.intersection(attrs)

    def at(*paths: str) -> str:
        present = [path for path in reversed(paths) if path in w.lines]
        return max(present, key=lambda path: w.lines[path]) if present else paths[-1]

    def found(value: Any) -> str:
        text = str(value)
        return repr(text) if isinstance(value, IPv4Address | IPv4Network | str) else text

    if valid("queue_outbound", "queue_inbound") and p.queue_outbound == p.queue_inbound:
        path = at("queues.outbound", "queues.inbound")
        other = "queues.inbound" if path == "queues.outbound" else "queues.outbound"
        w.problem(path, f"expected a queue number other than {other} ({p.queue_outbound}), "
                        f"found {p.queue_outbound}")
    if valid("call_id_first", "call_id_last") and p.call_id_first > p.call_id_last:
        if at("call_ids.first", "call_ids.last") == "call_ids.first":
            w.problem("call_ids.first", f"expected at most call_ids.last ({p.call_id_last}), "
                                        f"found {p.call_id_first} (an empty range)")
        else:
            w.problem("call_ids.last", f"expected at least call_ids.first ({p.call_id_first}), "
                                       f"found {p.call_id_last} (an empty range)")
    if valid("call_id_node", "call_id_nodes") and p.call_id_node > p.call_id_nodes:
        w.problem("call_ids.node",
                  f"expected call_ids.node from 1 to call_ids.nodes ({p.call_id_nodes}), "
                  f"found node {p.call_id_node}")
    inside = [a for a in p.public_addresses if p.is_inside(a)]
    if not valid("public_addresses", "public_interface", "inside_networks"):
        pass
    elif p.public_address is not None and p.public_interface is not None:
        path = at("public_address", "public_interface")
        other = "public_interface" if path == "public_address" else "public_address"
        value = p.public_interface if path == "public_interface" else _plain_public(
            p.public_addresses)
        w.problem(path, f"expected null when {other} is set (give one of them), "
                        f"found {found(value)}")
    elif inside:
        if at("inside_networks", "public_address") == "public_address":
            w.problem("public_address", "expected an address outside inside_networks, "
                                        f"found {found(inside[0])}")
        else:
            listed = ", ".join(str(n) for n in p.inside_networks)
            w.problem("inside_networks", f"expected networks that do not hold public_address "
                                         f"({inside[0]}), found {listed}")
    for f in (BY_ATTR["inside_networks"], *(BY_ATTR[a] for a in (
            "clients_allow", "clients_deny", "servers_allow", "servers_deny"))):
        nets: tuple[IPv4Network, ...] = getattr(p, f.attr)
        if not valid(f.attr):
            continue
        for j, net in enumerate(nets):
            for i in range(j):
                if nets[i].overlaps(net):
                    w.problem(f"{f.path}[{j}]",
                              f"expected a network that does not overlap {f.path}[{i}] "
                              f"({nets[i]}), found {found(net)}")
                    break
    for side in ("clients", "servers"):
        allow, deny = getattr(p, f"{side}_allow"), getattr(p, f"{side}_deny")
        if not valid(f"{side}_allow", f"{side}_deny"):
            continue
        for j, net in enumerate(deny):
            if net in allow:
                w.problem(f"acl.{side}.deny[{j}]",
                          f"expected a network not also in acl.{side}.allow, found {found(net)}")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with the nesting bounded where it recurses: in the composer.

    (Its scanner and parser keep their state on a list; composing and constructing a
    node recurse once per level, so MAX_DEPTH levels bound both.)
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


@dataclass(frozen=True, slots=True)
class _LongNumber:
    """What a number of more than MAX_NUMBER characters is read as: no field takes it."""

    length: int

    def __str__(self) -> str:
        return f"a number of {self.length} characters"


class _Constructor(SafeConstructor):
    """Plain values; a number of more than MAX_NUMBER characters is not converted."""

    _NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if node.tag in self._NUMBERS and len(node.value) > MAX_NUMBER:
            return _LongNumber(len(node.value))
        return super().construct_object(node, deep)


def _yaml_problem(exc: Exception) -> str:
    """The one-line gist of a YAML error (its str() spans lines, with a snippet)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        return str(exc.problem or exc.context)
    return " ".join(str(exc).split())


def parse_policy(text: str, source: str = "<policy>") -> LoadedPolicy:
    """Validate a YAML document into a policy; :class:`PolicyError` lists every problem.

    Bounded: at most MAX_BYTES, MAX_DEPTH levels, numbers of MAX_NUMBER characters;
    anything else in the text is a :class:`PolicyError`, never another exception.
    """
    if len(text) > MAX_BYTES:
        raise PolicyError([f"{source}: not a policy: {len(text)} characters, more than "
                           f"{MAX_BYTES}"])
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise PolicyError([f"{where}: not valid YAML: {_yaml_problem(exc)}"]) from exc
    except yaml.YAMLError as exc:
        raise PolicyError([f"{source}: not valid YAML: {_yaml_problem(exc)}"]) from exc
    finally:
        loader.dispose()
    w = _Walker(source)
    if root is not None:
        if isinstance(root, yaml.MappingNode):
            w.mapping(root, LAYOUT, "")
        elif not (isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null"):
            found = _found(root, w._scalar(root))
            w.problem("", f"expected a mapping of policy keys, found {found}",
                      root.start_mark.line + 1)
    values = {a: v for a, v in w.values.items() if a in BY_ATTR}
    publics = values.pop("public_addresses", ())
    policy = Policy(**values, public_address=publics[0] if publics else None,
                    other_public_addresses=publics[1:])
    _cross_checks(w, policy)
    if w.problems:
        raise PolicyError(w.problems)
    return LoadedPolicy(policy, source, w.lines)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _read_file(path: str | Path) -> bytes:
    """The bytes of the regular file ``path`` (at most MAX_BYTES): never waits on a FIFO
    or a device, never reads more than the bound."""

    def refuse_unless_regular(mode: int) -> None:
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise PolicyError([f"{path}: cannot read: {kind}, not a regular file"])

    try:
        refuse_unless_regular(os.stat(path).st_mode)  # a FIFO is not even opened
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)  # what was opened (it may have been replaced since)
            refuse_unless_regular(info.st_mode)
            if info.st_size > MAX_BYTES:
                raise PolicyError([f"{path}: cannot read: {info.st_size} bytes, more than "
                                   f"{MAX_BYTES} (a policy is a few KiB)"])
            chunks, size = [], 0
            while size <= MAX_BYTES:  # a file still growing stops at the bound too
                chunk = os.read(fd, MAX_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    if size > MAX_BYTES:
        raise PolicyError([f"{path}: cannot read: more than {MAX_BYTES} bytes "
                           "(a policy is a few KiB)"])
    return b"".join(chunks)


def read_policy(path: str | Path) -> LoadedPolicy:
    """The policy in the file ``path``, with the lines of its keys.

    Every way this fails, from a FIFO at ``path`` to a 5,000-level list in it, is a
    :class:`PolicyError` with one line per problem.
    """
    data = _read_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{path}: cannot read: not UTF-8 text ({exc.reason})"]) from exc
    return parse_policy(text, str(path))


def load_policy(path: str | Path | None) -> Policy:
    """The policy in ``path``, or the built-in default when ``path`` is None."""
    if path is None:
        return Policy()
    return read_policy(path).policy


# -- writing ---------------------------------------------------------------------------------


def yaml_value(value: Any) -> Any:
    """A policy attribute as a plain YAML value."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [str(v) for v in value]
    if isinstance(value, IPv4Address):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def policy_document(policy: Policy) -> dict[str, Any]:
    """The policy as the nested mapping of the YAML layout."""
    doc: dict[str, Any] = {}
    for f in FIELDS:
        *groups, leaf = f.path.split(".")
        node = doc
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = (f.plain or yaml_value)(getattr(policy, f.attr))
    return doc


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists: ``inside_networks: [10.0.0.0/8, ...]``."""


def _flow_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _flow_list)


def dump_policy(policy: Policy) -> str:
    """The whole policy as YAML, every field present: what ``check-policy`` prints."""
    return yaml.dump(policy_document(policy), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, width=1000)


def changes(old: Policy, new: Policy) -> Iterator[tuple[Field, Any, Any]]:
    """(field, old value, new value) of every field that differs, as YAML values."""
    for f in FIELDS:
        a, b = getattr(old, f.attr), getattr(new, f.attr)
        if a != b:
            plain = f.plain or yaml_value
            yield f, plain(a), plain(b)
