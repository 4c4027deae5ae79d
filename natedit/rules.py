"""Firewall rules: which packets the kernel hands to natedit, as data.

Theory of operation
-------------------
natedit sees every PPTP packet with the *private* client address, in both
directions, and owns GRE completely:

* TCP 1723 is queued in ``mangle FORWARD``: requests before the kernel's
  SNAT in POSTROUTING, replies after the kernel un-NATs them in PREROUTING.
  The kernel keeps doing the ordinary NAT (MASQUERADE) of the control
  connection; natedit does not add one: the operator's NAT rule stays as
  it is, and without one the control connection is not translated at all.
* Enhanced GRE (protocol 47, version 1) is exempt from conntrack in
  ``raw PREROUTING``: without the kernel's PPTP helper conntrack cannot key
  GRE v1 by Call ID, so it could neither route replies back nor masquerade
  two clients talking to one server. Inbound GRE (to the public address) is
  queued in ``mangle PREROUTING``, before routing, so that the private
  destination natedit writes is the one the kernel routes. Outbound GRE is
  queued in ``mangle FORWARD``, where natedit writes the public source.
* A safety net in ``mangle POSTROUTING`` drops GRE v1 that would leave with
  a source address still inside: no GRE ever leaves with a private source.
* No ``--queue-bypass`` (fail closed, policy ``on_worker_down: drop``, the
  default): with no worker bound, or a full queue, queued packets are
  dropped. PPTP stalls rather than leaks. With ``on_worker_down: pass`` the
  TCP 1723 queue rules get ``--queue-bypass``: while no worker is bound the
  control connection flows as without natedit (conntrack, the operator's
  MASQUERADE). GRE stays fail closed (it is notracked, so bypassed GRE
  would get no NAT and the safety net would drop it anyway).
* GRE version 0 (plain GRE tunnels) is not touched, nor is traffic between
  two inside networks.

What the operator keeps doing, and must know:

* the NAT of TCP 1723 (``-t nat -A POSTROUTING -o <wan> -j MASQUERADE`` or
  SNAT): natedit never adds one, with or without ``natedit run``;
* the filter: natedit queues in ``mangle``, before ``filter``, so in
  ``filter FORWARD`` outbound GRE already carries the public source and
  inbound GRE the private destination, and GRE is conntrack state
  UNTRACKED: a FORWARD chain that drops by default needs something like
  ``-p gre -m conntrack --ctstate UNTRACKED -j ACCEPT``;
* the kernel PPTP helper must not be attached to TCP 1723:
  :func:`check_no_pptp_helper` refuses to start if it is;
* GRE v1 to the public address is natedit's: the gateway itself cannot
  also be a PPTP endpoint on that address. One natedit per network
  namespace (ownership is by chain name).

The rules are one :class:`RuleSet` rendered two ways: iptables-restore
input (``iptables-nft`` turns it into nft rules with ``xt`` matches; the
native nft ``queue`` statement needs CONFIG_NFT_QUEUE, which some kernels
lack) and an nft script with a table of its own.

Ownership is by name: every iptables chain natedit creates is called
``NATEDIT-*`` and is entered by one jump from a built-in chain; the nft
flavour owns table ``ip natedit``. :func:`install` first removes whatever a
previous (crashed) run left, in the same atomic transaction, and
:func:`remove` deletes exactly those objects, then the empty base chains
and tables iptables-nft had to create for them.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import itertools
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from . import PPTP_PORT, NateditError, Policy, WorkerDown, host

CHAIN_PREFIX = "NATEDIT-"
"""Every iptables chain natedit creates starts with this; any chain so named is natedit's."""
NFT_TABLE = "natedit"
"""The table (family ip) of the nft flavour."""
GRE_V1_U32 = "0x0>>0x16&0x3c@0x0>>0x10&0x7=0x1"
"""xt_u32: skip the IP header (IHL * 4), read the GRE flags word, Ver == 1.

Written as iptables-save prints it, so rendered rules compare equal to saved ones.
"""


class RulesError(NateditError):
    """The rules cannot be rendered or installed as asked."""


class Flavour(enum.Enum):
    IPTABLES = "iptables"
    NFT = "nft"


class Hook(enum.Enum):
    """A (table, built-in chain) of iptables; an nft base chain at the same priority."""

    RAW_PREROUTING = ("raw", "PREROUTING")
    MANGLE_PREROUTING = ("mangle", "PREROUTING")
    MANGLE_FORWARD = ("mangle", "FORWARD")
    MANGLE_POSTROUTING = ("mangle", "POSTROUTING")

    def __init__(self, table: str, chain: str) -> None:
        self.table = table
        self.chain = chain

    @property
    def own_chain(self) -> str:
        return CHAIN_PREFIX + self.chain

    @property
    def nft_chain(self) -> str:
        return f"{self.table}_{self.chain.lower()}"


class Traffic(enum.Enum):
    """Which PPTP packets a rule selects."""

    CONTROL_TO_SERVER = "tcp, destination port 1723"
    CONTROL_FROM_SERVER = "tcp, source port 1723"
    GRE_V1 = "enhanced GRE (protocol 47, version 1)"


class Flow(enum.Enum):
    """Which way across the gateway, by address."""

    OUTBOUND = "source inside, destination not inside"
    INBOUND = "destination inside, source not inside"
    TO_PUBLIC = "destination is the public address"


class Verb(enum.Enum):
    QUEUE = "queue"
    NOTRACK = "notrack"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Rule:
    hook: Hook
    traffic: Traffic
    flow: Flow
    verb: Verb
    queue: int | None = None
    """The NFQUEUE number when ``verb`` is QUEUE."""
    why: str = ""
    bypass: bool = False
    """QUEUE only: with no worker bound the packet is accepted (``--queue-bypass``)."""


@dataclass(frozen=True, slots=True)
class RuleSet:
    public_address: IPv4Address
    inside_networks: tuple[IPv4Network, ...]
    """Collapsed: no two overlap."""
    rules: tuple[Rule, ...]
    other_public: tuple[IPv4Address, ...] = ()
    """The policy's other public addresses (several uplinks, an SNAT pool): GRE to
    each of them is natedit's too."""

    @property
    def public_addresses(self) -> tuple[IPv4Address, ...]:
        return (self.public_address, *self.other_public)

    @property
    def hooks(self) -> tuple[Hook, ...]:
        return tuple(dict.fromkeys(rule.hook for rule in self.rules))


def build_ruleset(policy: Policy) -> RuleSet:
    """The rules for ``policy``, whose public_address must be resolved."""
    public = policy.public_address
    if public is None:
        raise RulesError("public_address is not resolved (none in the policy, none found)")
    for each in policy.public_addresses:
        if policy.is_inside(each):
            raise RulesError(f"public_address {each} is inside inside_networks")
    out, into = policy.queue_outbound, policy.queue_inbound
    H, T, F, V = Hook, Traffic, Flow, Verb
    rules: tuple[Rule, ...] = (
        Rule(H.RAW_PREROUTING, T.GRE_V1, F.TO_PUBLIC, V.NOTRACK,
             why="GRE to the public address is natedit's, not conntrack's"),
        Rule(H.RAW_PREROUTING, T.GRE_V1, F.OUTBOUND, V.NOTRACK,
             why="GRE from a client is natedit's, not conntrack's (nor MASQUERADE's)"),
        Rule(H.MANGLE_PREROUTING, T.GRE_V1, F.TO_PUBLIC, V.QUEUE, into,
             why="inbound GRE, before routing: the private destination written is routed"),
        Rule(H.MANGLE_FORWARD, T.CONTROL_TO_SERVER, F.OUTBOUND, V.QUEUE, out,
             why="control, client to server: private source, before the kernel's SNAT"),
        Rule(H.MANGLE_FORWARD, T.CONTROL_FROM_SERVER, F.INBOUND, V.QUEUE, into,
             why="control, server to client: private destination, after the kernel un-NATs"),
        Rule(H.MANGLE_FORWARD, T.GRE_V1, F.OUTBOUND, V.QUEUE, out,
             why="outbound GRE: natedit writes the public source"),
        Rule(H.MANGLE_POSTROUTING, T.GRE_V1, F.OUTBOUND, V.DROP,
             why="safety net: no GRE leaves with a private source"),
    )  # fmt: skip
    if policy.on_worker_down is WorkerDown.PASS:
        rules = tuple(
            dataclasses.replace(r, bypass=True) if r.traffic in _CONTROL else r for r in rules
        )
    inside = tuple(ipaddress.collapse_addresses(policy.inside_networks))
    return RuleSet(public, inside, rules, policy.other_public_addresses)


_CONTROL = frozenset({Traffic.CONTROL_TO_SERVER, Traffic.CONTROL_FROM_SERVER})
"""What ``on_worker_down: pass`` lets through while no worker is bound."""


def bypasses(rs: RuleSet) -> bool:
    """Whether any queue rule of ``rs`` lets packets through with no worker bound."""
    return any(rule.bypass for rule in rs.rules)


# -- iptables flavour -------------------------------------------------------

_IPT_TRAFFIC = {
    Traffic.CONTROL_TO_SERVER: f"-p tcp -m tcp --dport {PPTP_PORT}",
    Traffic.CONTROL_FROM_SERVER: f"-p tcp -m tcp --sport {PPTP_PORT}",
    Traffic.GRE_V1: "-p gre",
}
"""What selects the traffic natively (iptables-nft turns it into nft expressions)."""
_IPT_EXACT = {Traffic.GRE_V1: f'-m u32 --u32 "{GRE_V1_U32}"'}
"""The rest of the selection, through xt compatibility (costly per packet): checked last,
once the addresses have matched, so GRE that is not natedit's (and GRE the kernel fast
path already translated) never pays for it."""
_IPT_TRAFFIC_CHAIN = {Traffic.GRE_V1: "-GRE"}
"""Flow chains of traffic with an exact part are their own (the part sits on their
targets)."""
_IPT_FLOW_CHAIN = {Flow.OUTBOUND: "-OUT", Flow.INBOUND: "-IN"}
_IPT_FLOW_EXCLUDE = {Flow.OUTBOUND: "-d", Flow.INBOUND: "-s"}
"""The side that must not be inside: those packets RETURN."""
_IPT_FLOW_SELECT = {Flow.OUTBOUND: "-s", Flow.INBOUND: "-d"}
"""The side that must be inside."""


def _ipt_target(rule: Rule) -> str:
    if rule.verb is Verb.QUEUE:
        bypass = " --queue-bypass" if rule.bypass else ""
        return f"-j NFQUEUE --queue-num {rule.queue}{bypass}"
    return {Verb.NOTRACK: "-j CT --notrack", Verb.DROP: "-j DROP"}[rule.verb]


def iptables_blocks(rs: RuleSet) -> dict[str, list[str]]:
    """iptables-restore lines per table, in iptables-save's own spelling.

    Each hook gets a chain ``NATEDIT-<CHAIN>`` entered by one jump inserted
    first in the built-in chain. "Inside and the other side not inside" has
    no single-rule form for several networks, so each (hook, flow) gets a
    chain ``NATEDIT-<CHAIN>-OUT|IN``: RETURN for the excluded side, then the
    target for each inside network. GRE's version check (xt ``u32``) comes
    last: on the targets of its own flow chains ``NATEDIT-<CHAIN>-GRE-OUT``,
    after the public address in the other rules.
    """
    chains: dict[str, dict[str, list[str]]] = {}
    jumps: dict[str, list[str]] = {}
    flow_targets: dict[str, str] = {}
    for rule in rs.rules:
        table = chains.setdefault(rule.hook.table, {})
        main = rule.hook.own_chain
        if main not in table:
            table[main] = []
            jumps.setdefault(rule.hook.table, []).append(f"-I {rule.hook.chain} 1 -j {main}")
        target = _ipt_target(rule)
        traffic = _IPT_TRAFFIC[rule.traffic]
        exact = _IPT_EXACT.get(rule.traffic)
        table[main].append(f"# {rule.why}")
        if rule.flow is Flow.TO_PUBLIC:
            table[main] += [f"-A {main} -d {public}/32 {traffic}"
                            + (f" {exact}" if exact else "") + f" {target}"
                            for public in rs.public_addresses]
            continue
        flow_chain = main + _IPT_TRAFFIC_CHAIN.get(rule.traffic, "") + _IPT_FLOW_CHAIN[rule.flow]
        if exact:
            target = f"{exact} {target}"
        table[main].append(f"-A {main} {traffic} -j {flow_chain}")
        if flow_chain in table:
            if flow_targets[flow_chain] != target:
                raise RulesError(f"{flow_chain}: two targets for one flow chain")
            continue
        flow_targets[flow_chain] = target
        exclude, select = _IPT_FLOW_EXCLUDE[rule.flow], _IPT_FLOW_SELECT[rule.flow]
        nets = rs.inside_networks
        table[flow_chain] = [f"-A {flow_chain} {exclude} {net} -j RETURN" for net in nets]
        table[flow_chain] += [f"-A {flow_chain} {select} {net} {target}" for net in nets]
    return {
        name: [f":{chain} - [0:0]" for chain in table]
        + jumps[name]
        + [line for lines in table.values() for line in lines]
        for name, table in chains.items()
    }


def render_iptables(rs: RuleSet) -> str:
    """Input for ``iptables-restore --noflush`` that installs ``rs``."""
    head = [
        "# natedit rules: iptables-restore --noflush < this",
        ("# public address " if not rs.other_public else "# public addresses ")
        + ", ".join(str(a) for a in rs.public_addresses) + ", inside "
        + ", ".join(str(net) for net in rs.inside_networks),
        "# on_worker_down: pass: --queue-bypass on TCP 1723, with no worker bound it is "
        "not translated; GRE is dropped"
        if bypasses(rs) else
        "# no --queue-bypass: with no worker bound, queued PPTP packets are dropped",
    ]
    return _restore_script(iptables_blocks(rs), head)


def _restore_script(blocks: dict[str, list[str]], head: Iterable[str] = ()) -> str:
    lines = list(head)
    for table, body in blocks.items():
        lines += [f"*{table}", *body, "COMMIT"]
    return "\n".join(lines) + "\n"


def iptables_removal(saved: str) -> dict[str, list[str]]:
    """iptables-restore lines per table that delete every natedit object in ``saved``.

    ``saved`` is iptables-save output. Rules in other chains that jump to a
    ``NATEDIT-*`` chain are deleted by their own spelling (once per copy),
    then every ``NATEDIT-*`` chain is flushed, then deleted.
    """
    owned: dict[str, list[str]] = {}
    refs: dict[str, list[str]] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith(CHAIN_PREFIX):
                owned.setdefault(table, []).append(chain)
        elif line.startswith("-A "):
            words = shlex.split(line)
            if not words[1].startswith(CHAIN_PREFIX) and _jumps_to_ours(words):
                refs.setdefault(table, []).append("-D" + line[2:])
    return {
        name: refs.get(name, [])
        + [f"-F {chain}" for chain in owned.get(name, [])]
        + [f"-X {chain}" for chain in owned.get(name, [])]
        for name in dict.fromkeys([*refs, *owned])
    }


def _jumps_to_ours(words: list[str]) -> bool:
    return any(
        word in ("-j", "-g") and nxt.startswith(CHAIN_PREFIX)
        for word, nxt in itertools.pairwise(words)
    )


def _merge(*parts: dict[str, list[str]]) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for part in parts:
        for table, lines in part.items():
            merged.setdefault(table, []).extend(lines)
    return merged


# -- nft flavour ------------------------------------------------------------

_NFT_TRAFFIC = {
    Traffic.CONTROL_TO_SERVER: f"tcp dport {PPTP_PORT}",
    Traffic.CONTROL_FROM_SERVER: f"tcp sport {PPTP_PORT}",
    Traffic.GRE_V1: "ip protocol gre @th,13,3 1",
}
_NFT_FLOW = {
    Flow.OUTBOUND: "ip saddr @inside ip daddr != @inside",
    Flow.INBOUND: "ip daddr @inside ip saddr != @inside",
}
_NFT_VERB = {Verb.NOTRACK: "notrack", Verb.DROP: "drop"}


def _nft_statement(rule: Rule, rs: RuleSet) -> str:
    publics = (str(rs.public_address) if not rs.other_public
               else "{ " + ", ".join(str(a) for a in rs.public_addresses) + " }")
    flow = f"ip daddr {publics}" if rule.flow is Flow.TO_PUBLIC else _NFT_FLOW[rule.flow]
    if rule.verb is Verb.QUEUE:
        verb = f"queue num {rule.queue}" + (" bypass" if rule.bypass else "")
    else:
        verb = _NFT_VERB[rule.verb]
    return f'{_NFT_TRAFFIC[rule.traffic]} {flow} {verb} comment "{rule.why}"'


def render_nft(rs: RuleSet) -> str:
    """An ``nft -f`` script that (re)creates table ``ip natedit`` atomically.

    Needs the nft ``queue`` statement (CONFIG_NFT_QUEUE). Removal is
    ``nft delete table ip natedit``.
    """
    head = (
        ["# natedit rules, nft flavour; on_worker_down: pass: queue bypass on TCP 1723,",
         "# with no worker bound it is not translated; GRE is dropped."]
        if bypasses(rs) else
        ["# natedit rules, nft flavour; no queue bypass: with no worker bound,",
         "# queued PPTP packets are dropped."]
    )
    lines = [
        "#!/usr/sbin/nft -f",
        *head,
        f"table ip {NFT_TABLE}",
        f"delete table ip {NFT_TABLE}",
        f"table ip {NFT_TABLE} {{",
        "\tset inside {",
        "\t\ttype ipv4_addr",
        "\t\tflags interval",
        "\t\telements = { " + ", ".join(str(n) for n in rs.inside_networks) + " }",
        "\t}",
    ]
    for hook in rs.hooks:
        lines += [
            "",
            f"\tchain {hook.nft_chain} {{",
            f"\t\ttype filter hook {hook.chain.lower()} priority {hook.table}; policy accept;",
            *(f"\t\t{_nft_statement(r, rs)}" for r in rs.rules if r.hook is hook),
            "\t}",
        ]
    return "\n".join([*lines, "}"]) + "\n"


NFT_REMOVAL = f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
"""Deletes table ip natedit whether or not it exists."""


# -- the kernel's own PPTP helper -----------------------------------------------


def pptp_helper_rules(saved: str, inside: tuple[IPv4Network, ...]) -> list[str]:
    """The raw-table rules in ``saved`` (iptables-save) that attach the kernel
    PPTP helper to control connections natedit handles.

    A rule counts unless it is limited to ports without 1723 or to sources
    outside every inside network.
    """
    found = []
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        if table != "raw" or not line.startswith("-A ") or "--helper" not in line:
            continue
        words = shlex.split(line)
        if _option(words, "--helper") != (False, "pptp"):
            continue
        negated, ports = _option(words, "--dport", "--dports")
        if ports is not None and (_has_port(ports) == negated):
            continue
        negated, source = _option(words, "-s")
        if source is not None and not negated:
            net = IPv4Network(source, strict=False)
            if not any(net.overlaps(i) for i in inside):
                continue
        found.append(f"raw: {line}")
    return found


def _option(words: list[str], *names: str) -> tuple[bool, str | None]:
    """(negated, value) of the first of ``names`` in an iptables-save rule."""
    for i, word in enumerate(words[:-1]):
        if word in names:
            return (i > 0 and words[i - 1] == "!"), words[i + 1]
    return False, None


def _has_port(spec: str) -> bool:
    for part in spec.split(","):
        low, colon, high = part.partition(":")
        first = int(low or 0)
        if first <= PPTP_PORT <= (int(high or 65535) if colon else first):
            return True
    return False


def nft_pptp_helpers(objects: list[dict[str, Any]]) -> list[str]:
    """Native nft ``ct helper`` objects of type pptp in ``nft -j list ruleset`` objects."""
    return [
        f"nft: ct helper {o['ct helper']['family']} {o['ct helper']['table']} "
        f"{o['ct helper']['name']} (type pptp)"
        for o in objects
        if o.get("ct helper", {}).get("type") == "pptp"
    ]


def check_no_pptp_helper(inside: tuple[IPv4Network, ...]) -> None:
    """Refuse (RulesError) when the kernel PPTP helper may see natedit's flows.

    nf_nat_pptp would rewrite the same Call IDs a second time. Looks at
    iptables raw rules, native nft ct helper objects, and the automatic
    helper assignment of kernels before 6.0.
    """
    found = pptp_helper_rules(host.run(["iptables-save", "-t", "raw"]), inside)
    if host.have("nft"):
        found += nft_pptp_helpers(host.nft_ruleset())
    auto = host.read_text("/proc/sys/net/netfilter/nf_conntrack_helper")
    if (
        auto is not None
        and auto.strip() == "1"
        and host.read_text("/sys/module/nf_conntrack_pptp/initstate")
    ):
        found.append("sysctl net.netfilter.nf_conntrack_helper=1 with nf_conntrack_pptp loaded")
    if found:
        raise RulesError(
            "the kernel PPTP helper is attached to TCP 1723 and would rewrite Call IDs "
            "natedit rewrites; remove it first: " + " | ".join(found)
        )


# -- install and remove ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NftChains:
    """What iptables-nft tables and base chains existed (family ip), for pruning."""

    tables: frozenset[str]
    base_chains: frozenset[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Installation:
    """What :func:`remove` needs to undo one :func:`install`."""

    flavour: Flavour
    hooks: tuple[Hook, ...]
    before: NftChains | None
    """Tables and base chains before install; None = unknown (a previous run crashed)."""


def install(rs: RuleSet, flavour: Flavour) -> Installation:
    """Install ``rs``, replacing anything a previous natedit run left behind."""
    if flavour is Flavour.NFT:
        _remove_iptables(before=None, hooks=tuple(Hook))
        try:
            host.run(["nft", "-f", "-"], stdin=render_nft(rs))
        except host.HostError as exc:
            raise RulesError(
                f"{exc} (the nft queue statement needs CONFIG_NFT_QUEUE: try --flavour iptables)"
            ) from exc
        return Installation(flavour, rs.hooks, None)
    if host.have("nft"):
        host.run(["nft", "-f", "-"], stdin=NFT_REMOVAL)
    leftovers = iptables_removal(host.run(["iptables-save"]))
    before = None
    if not leftovers and host.have("nft") and host.iptables_is_nft():
        before = nft_chains(host.nft_ruleset("ip"))
    host.run(
        ["iptables-restore", "--noflush"],
        stdin=_restore_script(_merge(leftovers, iptables_blocks(rs))),
    )
    return Installation(flavour, rs.hooks, before)


def remove(installation: Installation) -> None:
    """Undo ``installation``: the ruleset is as it was before :func:`install`."""
    if installation.flavour is Flavour.NFT:
        host.run(["nft", "-f", "-"], stdin=NFT_REMOVAL)
    else:
        _remove_iptables(installation.before, installation.hooks)


def cleanup() -> None:
    """Remove everything any natedit run installed, in both flavours."""
    if host.have("nft"):
        host.run(["nft", "-f", "-"], stdin=NFT_REMOVAL)
    _remove_iptables(before=None, hooks=tuple(Hook))


def _remove_iptables(before: NftChains | None, hooks: tuple[Hook, ...]) -> None:
    """Delete natedit's chains, then prune (against ``before``, or after leftovers only)."""
    blocks = iptables_removal(host.run(["iptables-save"]))
    if blocks:
        host.run(["iptables-restore", "--noflush"], stdin=_restore_script(blocks))
    elif before is None:
        return  # nothing of natedit's: the empty base chains there are not ours either
    if host.have("nft") and host.iptables_is_nft():
        script = nft_prune(host.nft_ruleset("ip"), before, hooks)
        if script:
            host.run(["nft", "-f", "-"], stdin=script)


def nft_chains(objects: list[dict[str, Any]]) -> NftChains:
    tables = frozenset(o["table"]["name"] for o in objects if "table" in o)
    chains = frozenset(
        (o["chain"]["table"], o["chain"]["name"])
        for o in objects
        if "chain" in o and "hook" in o["chain"]
    )
    return NftChains(tables, chains)


def nft_prune(
    objects: list[dict[str, Any]], before: NftChains | None, hooks: Iterable[Hook]
) -> str:
    """nft commands deleting what iptables-nft created for natedit and no longer uses.

    ``objects`` is ``nft -j list ruleset ip`` after the NATEDIT chains are
    gone. A base chain of one of ``hooks`` goes when it is empty, accepts by
    policy and was not there before; its table goes when nothing is left in
    it and it was not there before. With ``before`` unknown (after a crash)
    every such empty base chain and table goes: they filter nothing.
    """
    used: dict[tuple[str, str], int] = {}
    contents: dict[str, int] = {}
    for o in objects:
        kind, body = next(iter(o.items()))
        if kind == "rule":
            key = (body["table"], body["chain"])
            used[key] = used.get(key, 0) + 1
        elif kind != "table" and isinstance(body, dict) and "table" in body:
            contents[body["table"]] = contents.get(body["table"], 0) + 1
    now = nft_chains(objects)
    policies = {
        (o["chain"]["table"], o["chain"]["name"]): o["chain"].get("policy", "accept")
        for o in objects
        if "chain" in o
    }
    commands = []
    for hook in hooks:
        key = (hook.table, hook.chain)
        if (
            key in now.base_chains
            and used.get(key, 0) == 0
            and policies[key] == "accept"
            and (before is None or key not in before.base_chains)
        ):
            commands.append(f"delete chain ip {hook.table} {hook.chain}")
            contents[hook.table] -= 1
    for table in dict.fromkeys(hook.table for hook in hooks):
        if (
            table in now.tables
            and contents.get(table, 0) == 0
            and (before is None or table not in before.tables)
        ):
            commands.append(f"delete table ip {table}")
    return "".join(f"{c}\n" for c in commands)
