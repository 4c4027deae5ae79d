"""Firewall rules: which packets the kernel hands to natedit, as data.

Theory of operation
-------------------
natedit claims only what is its own: the control connections its clients
open to servers outside (the gateway's own client among them), and the GRE of
its calls. Everything else (GRE and
TCP 1723 of a port-forwarded inside server, of a pptpd on the gateway,
GRE version 0 tunnels, GRE of calls natedit has no record
of) takes the path it would take without natedit: conntrack, NAT, the
operator's filter.

* TCP 1723 is queued in ``mangle FORWARD`` when it goes from an inside
  network to outside it (destination port 1723: a client's request) or back
  (source port 1723: the server's reply): requests before the kernel's SNAT
  in POSTROUTING, replies after the kernel un-NATs them in PREROUTING. The
  kernel keeps doing the ordinary NAT (MASQUERADE) of the control
  connection; natedit does not add one: the operator's NAT rule stays as it
  is, and without one the control connection is not translated at all. A
  connection from outside to an inside server (a port forward) is neither,
  and is never queued; nor is one to a pptpd on the gateway (INPUT with
  destination port 1723).
* The gateway's own PPTP client is one more client, its "private" address a
  public one: its requests are queued in ``mangle OUTPUT`` (destination port
  1723, to neither an inside network nor loopback) and the server's replies
  in ``mangle INPUT`` (source port 1723, likewise), so that its calls get
  public Call IDs from the same pools and no inside call is given the one it
  uses toward the same server. Its inbound GRE is then claimed by ``own_in``
  like any call's (translated back to its own Call ID, delivered locally);
  its outbound GRE leaves through OUTPUT with the public source already and
  is not claimed (the guard below drops only inside sources).
* GRE is natedit's when its call table says so: table ``ip natedit`` holds
  sets the worker keeps equal to its call table (:mod:`natedit.owned`
  explains each): ``own_in`` (public address . server . public Call ID:
  the server's GRE to a call's public Call ID), ``own_out`` (client .
  server . server Call ID: a natedit client's GRE), ``own_server``
  (server . server Call ID: outbound GRE from any inside address to a
  natedit call's server Call ID, so that the core drops a spoofed source
  instead of the kernel masquerading it into that call) and ``own_peer``
  (server . public address: inbound GRE from a call's server to its public
  address with a Call ID no call has, a late or spoofed packet, is claimed
  too and dropped as ``no_call``; left to conntrack it would get the
  gateway's ICMP protocol-unreachable, and pptpd ends every call toward
  that address when one arrives).
  Only enhanced GRE (version 1, PPP, key present) is looked up, and no rule
  names the public address: the sets carry it. Native chains of that table
  (the *claim* chains, just before the queue rule's hook) exempt an owned
  packet from conntrack (which could key GRE v1 by Call ID only with the
  kernel's PPTP helper) and mark it with the bit :data:`CLAIM_MARK`; the
  queue rule matches the mark (natively, no ``xt`` match: iptables-nft
  turns ``-m mark`` into nft expressions), and a *settle* chain just after
  clears the bit again, in the same hook.
* Inbound GRE of a call is queued in ``raw PREROUTING``, before conntrack
  and before routing (the private destination natedit writes is the one the
  kernel routes). Outbound GRE of a call is queued in ``mangle FORWARD``,
  where natedit writes the public source.
* A safety net (``guard_postrouting``, after the kernel's source NAT) drops
  a call's GRE still carrying its client's (inside) address: no GRE of
  natedit's calls ever leaves with a private source.
* No ``--queue-bypass`` on GRE, ever, and none at all with policy
  ``on_worker_down: drop`` (the default): with no worker bound, or a full
  queue, queued packets are dropped: natedit's PPTP stalls rather than
  leaks, and everything natedit does not own keeps flowing. With
  ``on_worker_down: pass`` the TCP 1723 queue rules get ``--queue-bypass``:
  while no worker is bound new control connections flow as without natedit
  (conntrack, the operator's MASQUERADE), and the GRE of their calls, which
  no set holds, too. The GRE of natedit's own calls stays claimed and is
  dropped (their Call IDs are translated: passing them untranslated would
  reach the wrong call). The sets stay while no worker runs (a crash, a
  restart): fail-closed needs them; a stop removes them with the rules.
* GRE version 0 (plain GRE tunnels) is not touched, nor is traffic between
  two inside networks.

What the operator keeps doing, and must know:

* the NAT of TCP 1723 (``-t nat -A POSTROUTING -o <wan> -j MASQUERADE`` or
  SNAT): natedit never adds one, with or without ``natedit run``;
* the filter: natedit queues in ``raw`` and ``mangle``, before ``filter``,
  so in ``filter FORWARD`` outbound GRE of a call already carries the
  public source and inbound GRE the private destination, and both are
  conntrack state UNTRACKED: a FORWARD chain that drops by default needs
  something like ``-p gre -m conntrack --ctstate UNTRACKED -j ACCEPT``;
* natedit borrows the packet mark bit :data:`CLAIM_MARK` (0x10000000)
  between its claim and settle chains (priorities raw - 2 to raw + 1, and
  mangle - 1 to mangle + 1), for its own calls' GRE only;
* the kernel PPTP helper must not be attached to TCP 1723 of natedit's
  clients: :func:`check_no_pptp_helper` refuses to start if it is;
* one natedit per network namespace (ownership is by chain and table name).

The rules are one :class:`RuleSet` rendered two ways. The ``iptables``
flavour (for kernels without CONFIG_NFT_QUEUE, the native nft ``queue``
statement) is table ``ip natedit`` (the sets and the claim, settle and
guard chains, :func:`render_native`) plus iptables-restore input for the
queue rules (:func:`render_iptables`; ``iptables-nft`` turns it into nft
rules); the ``nft`` flavour is table ``ip natedit`` with the queue rules as
native chains too (:func:`render_nft`).

Ownership is by name: every iptables chain natedit creates is called
``NATEDIT-*`` and is entered by one jump from a built-in chain; table
``ip natedit`` is natedit's. :func:`install` first removes whatever a
previous (crashed) run left, and :func:`remove` deletes exactly those
objects, then the empty base chains and tables iptables-nft had to create
for them.
"""

from __future__ import annotations

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
"""natedit's own table (family ip): the ownership sets and the native chains (both
flavours)."""
CLAIM_MARK = 0x10000000
"""The packet mark bit natedit sets on the GRE of its calls just before a queue rule
and clears just after, within one hook."""
ENHANCED_GRE = "@th,0,32 & 0xe007ffff == 0x2001880b"
"""C=0 R=0 K=1, version 1, protocol PPP (0x880b): what the core takes for PPTP GRE."""
GRE_CALL_ID = "@th,48,16"
"""The Call ID of enhanced GRE (the low half of the key field)."""
OWN_IN = "own_in"
OWN_OUT = "own_out"
OWN_IN_TYPE = f"ip daddr . ip saddr . {GRE_CALL_ID}"
"""Set ``own_in``: public address . server . public Call ID."""
OWN_OUT_TYPE = f"ip saddr . ip daddr . {GRE_CALL_ID}"
"""Set ``own_out``: client . server . server Call ID."""
OWN_SERVER = "own_server"
OWN_SERVER_TYPE = f"ip daddr . {GRE_CALL_ID}"
"""Set ``own_server``: server . server Call ID (the ``own_out`` keys without the client)."""
OWN_PEER = "own_peer"
OWN_PEER_TYPE = "ip saddr . ip daddr"
"""Set ``own_peer``: server . public address (the ``own_in`` keys without the Call ID)."""


class RulesError(NateditError):
    """The rules cannot be rendered or installed as asked."""


class Flavour(enum.Enum):
    IPTABLES = "iptables"
    NFT = "nft"


class Hook(enum.Enum):
    """A (table, built-in chain) of iptables; an nft base chain at the same priority."""

    RAW_PREROUTING = ("raw", "PREROUTING")
    MANGLE_PREROUTING = ("mangle", "PREROUTING")
    """No longer used; kept so that cleanup prunes what earlier versions made there."""
    MANGLE_FORWARD = ("mangle", "FORWARD")
    MANGLE_POSTROUTING = ("mangle", "POSTROUTING")
    """No longer used (see MANGLE_PREROUTING)."""
    MANGLE_OUTPUT = ("mangle", "OUTPUT")
    """The gateway's own PPTP client: its requests."""
    MANGLE_INPUT = ("mangle", "INPUT")
    """The gateway's own PPTP client: its server's replies."""

    def __init__(self, table: str, chain: str) -> None:
        self.table = table
        self.chain = chain

    @property
    def own_chain(self) -> str:
        return CHAIN_PREFIX + self.chain

    @property
    def nft_chain(self) -> str:
        return f"{self.table}_{self.chain.lower()}"

    @property
    def priority(self) -> int:
        return _PRIORITIES[self.table]


_PRIORITIES = {"raw": -300, "mangle": -150}


class Stage(enum.Enum):
    """A base chain of table ``ip natedit`` (both flavours): its hook and priority."""

    CLAIM_PREROUTING = ("prerouting", -302)
    """Before raw (-300), where inbound GRE is queued."""
    SETTLE_PREROUTING = ("prerouting", -299)
    """After the raw queue rule, before conntrack (-200)."""
    CLAIM_FORWARD = ("forward", -151)
    """Before mangle (-150), where outbound GRE is queued."""
    SETTLE_FORWARD = ("forward", -149)
    """After it."""
    GUARD_POSTROUTING = ("postrouting", 101)
    """After the kernel's source NAT (100)."""

    def __init__(self, hook: str, priority: int) -> None:
        self.hook = hook
        self.priority = priority

    @property
    def nft_chain(self) -> str:
        return self.name.lower()


class Traffic(enum.Enum):
    """Which packets a rule selects."""

    CONTROL_TO_SERVER = "tcp, destination port 1723"
    CONTROL_FROM_SERVER = "tcp, source port 1723"
    OWNED_GRE_IN = "enhanced GRE of a natedit call, to its public Call ID (set own_in)"
    OWNED_GRE_OUT = "enhanced GRE of a natedit call, from its client (set own_out)"
    OWNED_GRE_TO_SERVER = ("enhanced GRE to a natedit call's server Call ID, from whichever "
                           "address (set own_server)")
    PEER_GRE_IN = ("enhanced GRE from a natedit call's server to its public address, "
                   "whatever the Call ID (set own_peer)")
    CLAIMED_GRE = "GRE natedit claimed (mark bit CLAIM_MARK)"


class Flow(enum.Enum):
    """Which way across the gateway, by address."""

    OUTBOUND = "source inside, destination not inside"
    INBOUND = "destination inside, source not inside"
    FROM_INSIDE = "source inside"
    FROM_GATEWAY = "the gateway's own, destination neither inside nor local (loopback)"
    TO_GATEWAY = "to the gateway, source neither inside nor local (loopback)"
    ANY = "whatever the addresses (the traffic says it all)"


class Verb(enum.Enum):
    QUEUE = "queue"
    NOTRACK = "notrack"
    DROP = "drop"
    CLAIM = "exempt from conntrack and set the mark bit"
    MARK = "set the mark bit"
    UNCLAIM = "clear the mark bit"


@dataclass(frozen=True, slots=True)
class Rule:
    hook: Hook | Stage
    """A Hook: a queue rule (iptables, or a native queue chain); a Stage: a native rule."""
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
    """For the rendered headers only: no rule names it (the ownership sets carry it)."""
    inside_networks: tuple[IPv4Network, ...]
    """Collapsed: no two overlap."""
    rules: tuple[Rule, ...]
    other_public: tuple[IPv4Address, ...] = ()
    """The policy's other public addresses (several uplinks, an SNAT pool); like the
    first, only in the headers (the sets' keys carry each call's)."""

    @property
    def public_addresses(self) -> tuple[IPv4Address, ...]:
        return (self.public_address, *self.other_public)

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The iptables (or native queue) hooks the rules use."""
        return tuple(dict.fromkeys(r.hook for r in self.rules if isinstance(r.hook, Hook)))

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(s for s in Stage if any(r.hook is s for r in self.rules))


@dataclass(frozen=True, slots=True)
class Owned:
    """Elements of the ownership sets, as nft reads them (``a . b . n``)."""

    inbound: tuple[str, ...] = ()
    outbound: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()


def build_ruleset(policy: Policy) -> RuleSet:
    """The rules for ``policy``, whose public_address must be resolved."""
    public = policy.public_address
    if public is None:
        raise RulesError("public_address is not resolved (none in the policy, none found)")
    for each in policy.public_addresses:
        if policy.is_inside(each):
            raise RulesError(f"public_address {each} is inside inside_networks")
    out, into = policy.queue_outbound, policy.queue_inbound
    passing = policy.on_worker_down is WorkerDown.PASS
    H, S, T, F, V = Hook, Stage, Traffic, Flow, Verb
    rules: tuple[Rule, ...] = (
        Rule(S.CLAIM_PREROUTING, T.OWNED_GRE_IN, F.ANY, V.CLAIM,
             why="the server's GRE to a natedit call: natedit's, not conntrack's"),
        Rule(S.CLAIM_PREROUTING, T.PEER_GRE_IN, F.ANY, V.CLAIM,
             why="a natedit call's server, a Call ID no call has: natedit's (no_call), "
                 "no ICMP that would end pptpd's calls"),
        Rule(S.CLAIM_PREROUTING, T.OWNED_GRE_OUT, F.ANY, V.NOTRACK,
             why="a natedit client's GRE: natedit's, not conntrack's (nor MASQUERADE's)"),
        Rule(H.RAW_PREROUTING, T.CLAIMED_GRE, F.ANY, V.QUEUE, into,
             why="inbound GRE of a call, before routing: the private destination is routed"),
        Rule(S.SETTLE_PREROUTING, T.CLAIMED_GRE, F.ANY, V.UNCLAIM,
             why="the mark bit was natedit's for this hook only"),
        Rule(H.MANGLE_FORWARD, T.CONTROL_TO_SERVER, F.OUTBOUND, V.QUEUE, out,
             why="control, client to server: private source, before the kernel's SNAT",
             bypass=passing),
        Rule(H.MANGLE_FORWARD, T.CONTROL_FROM_SERVER, F.INBOUND, V.QUEUE, into,
             why="control, server to client: private destination, after the kernel un-NATs",
             bypass=passing),
        Rule(S.CLAIM_FORWARD, T.OWNED_GRE_TO_SERVER, F.FROM_INSIDE, V.MARK,
             why="GRE to a natedit call's server Call ID: claimed for the queue "
                 "(a source that is not its client's is dropped there)"),
        Rule(H.MANGLE_FORWARD, T.CLAIMED_GRE, F.ANY, V.QUEUE, out,
             why="outbound GRE of a call: natedit writes the public source"),
        Rule(S.SETTLE_FORWARD, T.CLAIMED_GRE, F.ANY, V.UNCLAIM,
             why="the mark bit was natedit's for this hook only"),
        Rule(H.MANGLE_OUTPUT, T.CONTROL_TO_SERVER, F.FROM_GATEWAY, V.QUEUE, out,
             why="control, the gateway's own client to a server: its calls get public "
                 "Call IDs from the same pools",
             bypass=passing),
        Rule(H.MANGLE_INPUT, T.CONTROL_FROM_SERVER, F.TO_GATEWAY, V.QUEUE, into,
             why="control, a server to the gateway's own client (not to a pptpd on the "
                 "gateway: destination port 1723 is never queued here)",
             bypass=passing),
        Rule(S.GUARD_POSTROUTING, T.OWNED_GRE_OUT, F.FROM_INSIDE, V.DROP,
             why="safety net: no GRE of a natedit call leaves with a private source"),
    )  # fmt: skip
    inside = tuple(ipaddress.collapse_addresses(policy.inside_networks))
    return RuleSet(public, inside, rules, policy.other_public_addresses)


def bypasses(rs: RuleSet) -> bool:
    """Whether any queue rule of ``rs`` lets packets through with no worker bound."""
    return any(rule.bypass for rule in rs.rules)


def _bypass_note(rs: RuleSet) -> list[str]:
    if bypasses(rs):
        return ["on_worker_down: pass: --queue-bypass on TCP 1723: with no worker bound new",
                "control connections (and their calls' GRE) go on untranslated; the GRE of",
                "natedit's own calls is dropped"]
    return ["no --queue-bypass: with no worker bound, queued PPTP packets are dropped"]


# -- iptables flavour (the queue rules) -------------------------------------------------

_MARK_TEXT = f"{CLAIM_MARK:#x}/{CLAIM_MARK:#x}"
_IPT_TRAFFIC = {
    Traffic.CONTROL_TO_SERVER: f"-p tcp -m tcp --dport {PPTP_PORT}",
    Traffic.CONTROL_FROM_SERVER: f"-p tcp -m tcp --sport {PPTP_PORT}",
    Traffic.CLAIMED_GRE: f"-p gre -m mark --mark {_MARK_TEXT}",
}
"""What selects the traffic (iptables-nft turns all of it into native nft expressions)."""
_IPT_FLOW_CHAIN = {Flow.OUTBOUND: "-OUT", Flow.INBOUND: "-IN",
                   Flow.FROM_GATEWAY: "-OUT", Flow.TO_GATEWAY: "-IN"}
_IPT_FLOW_EXCLUDE = {Flow.OUTBOUND: "-d", Flow.INBOUND: "-s",
                     Flow.FROM_GATEWAY: "-d", Flow.TO_GATEWAY: "-s"}
"""The side that must not be inside: those packets RETURN."""
_IPT_FLOW_SELECT = {Flow.OUTBOUND: "-s", Flow.INBOUND: "-d"}
"""The side that must be inside (the gateway's own flows: none, the hook says it)."""
_IPT_FLOW_LOOPBACK = {Flow.FROM_GATEWAY: "-o lo", Flow.TO_GATEWAY: "-i lo"}
"""The gateway's own flows: loopback RETURNs too (the gateway calling itself)."""


def _ipt_target(rule: Rule) -> str:
    if rule.verb is not Verb.QUEUE:
        raise RulesError(f"{rule.hook}: only queue rules are iptables rules")
    bypass = " --queue-bypass" if rule.bypass else ""
    return f"-j NFQUEUE --queue-num {rule.queue}{bypass}"


def iptables_blocks(rs: RuleSet) -> dict[str, list[str]]:
    """iptables-restore lines per table, in iptables-save's own spelling.

    Each hook gets a chain ``NATEDIT-<CHAIN>`` entered by one jump inserted
    first in the built-in chain. "Inside and the other side not inside" has
    no single-rule form for several networks, so each (hook, flow) of the
    control connection gets a chain ``NATEDIT-<CHAIN>-OUT|IN``: RETURN for
    the excluded side, then the target for each inside network. GRE needs no
    addresses: the native chains claimed it (the mark) by the call table.
    """
    chains: dict[str, dict[str, list[str]]] = {}
    jumps: dict[str, list[str]] = {}
    for rule in rs.rules:
        if not isinstance(rule.hook, Hook):
            continue
        table = chains.setdefault(rule.hook.table, {})
        main = rule.hook.own_chain
        if main not in table:
            table[main] = []
            jumps.setdefault(rule.hook.table, []).append(f"-I {rule.hook.chain} 1 -j {main}")
        target = _ipt_target(rule)
        traffic = _IPT_TRAFFIC[rule.traffic]
        table[main].append(f"# {rule.why}")
        if rule.flow is Flow.ANY:
            table[main].append(f"-A {main} {traffic} {target}")
            continue
        flow_chain = main + _IPT_FLOW_CHAIN[rule.flow]
        table[main].append(f"-A {main} {traffic} -j {flow_chain}")
        if flow_chain in table:
            raise RulesError(f"{flow_chain}: two rules for one flow chain")
        exclude, select = _IPT_FLOW_EXCLUDE[rule.flow], _IPT_FLOW_SELECT.get(rule.flow)
        nets = rs.inside_networks
        loopback = _IPT_FLOW_LOOPBACK.get(rule.flow)
        table[flow_chain] = [f"-A {flow_chain} {loopback} -j RETURN"] if loopback else []
        table[flow_chain] += [f"-A {flow_chain} {exclude} {net} -j RETURN" for net in nets]
        if select is None:
            table[flow_chain].append(f"-A {flow_chain} {target}")
        else:
            table[flow_chain] += [f"-A {flow_chain} {select} {net} {target}" for net in nets]
    return {
        name: [f":{chain} - [0:0]" for chain in table]
        + jumps[name]
        + [line for lines in table.values() for line in lines]
        for name, table in chains.items()
    }


def render_iptables(rs: RuleSet) -> str:
    """Input for ``iptables-restore --noflush`` that installs ``rs``'s queue rules (the
    ``iptables`` flavour; table ``ip natedit`` of :func:`render_native` goes first)."""
    head = [
        "# natedit rules: iptables-restore --noflush < this",
        ("# public address " if not rs.other_public else "# public addresses ")
        + ", ".join(str(a) for a in rs.public_addresses) + ", inside "
        + ", ".join(str(net) for net in rs.inside_networks),
        *(f"# {line}" for line in _bypass_note(rs)),
        f"# needs table ip {NFT_TABLE} (natedit rules --flavour iptables --native) loaded first",
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



# -- nft: table ip natedit --------------------------------------------------------------

_NFT_MARKED = f"meta mark & {CLAIM_MARK:#010x} == {CLAIM_MARK:#010x}"
_NFT_TRAFFIC = {
    Traffic.CONTROL_TO_SERVER: f"tcp dport {PPTP_PORT}",
    Traffic.CONTROL_FROM_SERVER: f"tcp sport {PPTP_PORT}",
    Traffic.OWNED_GRE_IN: f"ip protocol gre {ENHANCED_GRE} {OWN_IN_TYPE} @{OWN_IN}",
    Traffic.OWNED_GRE_OUT: f"ip protocol gre {ENHANCED_GRE} {OWN_OUT_TYPE} @{OWN_OUT}",
    Traffic.OWNED_GRE_TO_SERVER: (f"ip protocol gre {ENHANCED_GRE} {OWN_SERVER_TYPE} "
                                  f"@{OWN_SERVER}"),
    Traffic.PEER_GRE_IN: f"ip protocol gre {ENHANCED_GRE} {OWN_PEER_TYPE} @{OWN_PEER}",
    Traffic.CLAIMED_GRE: f"ip protocol gre {_NFT_MARKED}",
}
_NFT_FLOW = {
    Flow.OUTBOUND: "ip saddr @inside ip daddr != @inside",
    Flow.INBOUND: "ip daddr @inside ip saddr != @inside",
    Flow.FROM_INSIDE: "ip saddr @inside",
    Flow.FROM_GATEWAY: 'oifname != "lo" ip daddr != @inside',
    Flow.TO_GATEWAY: 'iifname != "lo" ip saddr != @inside',
    Flow.ANY: "",
}
_NFT_SET_MARK = f"meta mark set meta mark | {CLAIM_MARK:#010x}"
_NFT_VERB = {
    Verb.NOTRACK: "notrack",
    Verb.DROP: "drop",
    Verb.CLAIM: f"notrack {_NFT_SET_MARK}",
    Verb.MARK: _NFT_SET_MARK,
    Verb.UNCLAIM: f"meta mark set meta mark & {~CLAIM_MARK & 0xFFFFFFFF:#010x}",
}


def _nft_statement(rule: Rule) -> str:
    if rule.verb is Verb.QUEUE:
        verb = f"queue num {rule.queue}" + (" bypass" if rule.bypass else "")
    else:
        verb = _NFT_VERB[rule.verb]
    words = [_NFT_TRAFFIC[rule.traffic], _NFT_FLOW[rule.flow], verb, f'comment "{rule.why}"']
    return " ".join(w for w in words if w)


def _set_lines(name: str, typeof: str, elements: Iterable[str]) -> list[str]:
    items = list(elements)
    body = [f"\t\ttypeof {typeof}"]
    if items:
        body.append("\t\telements = { " + ", ".join(items) + " }")
    return [f"\tset {name} {{", *body, "\t}"]


_HOOK_ORDER = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}


def _table(rs: RuleSet, owned: Owned | None, *, queues: bool) -> list[str]:
    """Table ``ip natedit`` created afresh (replacing one left behind): the sets, with
    ``owned`` in them, the native chains and (``queues``: the nft flavour) the queue
    chains."""
    owned = owned or Owned()
    lines = [
        f"table ip {NFT_TABLE}",
        f"delete table ip {NFT_TABLE}",
        f"table ip {NFT_TABLE} {{",
        "\tset inside {",
        "\t\ttype ipv4_addr",
        "\t\tflags interval",
        "\t\telements = { " + ", ".join(str(n) for n in rs.inside_networks) + " }",
        "\t}",
        *_set_lines(OWN_IN, OWN_IN_TYPE, owned.inbound),
        *_set_lines(OWN_OUT, OWN_OUT_TYPE, owned.outbound),
        *_set_lines(OWN_SERVER, OWN_SERVER_TYPE, owned.servers),
        *_set_lines(OWN_PEER, OWN_PEER_TYPE, owned.peers),
    ]
    chains: list[tuple[str, int, Hook | Stage, str]] = [
        (s.hook, s.priority, s, str(s.priority)) for s in rs.stages]
    if queues:
        chains += [(h.chain.lower(), h.priority, h, h.table) for h in rs.hooks]
    chains.sort(key=lambda c: (_HOOK_ORDER[c[0]], c[1]))
    for hook_name, _, hook, priority in chains:
        lines += [
            "",
            f"\tchain {hook.nft_chain} {{",
            f"\t\ttype filter hook {hook_name} priority {priority}; policy accept;",
            *(f"\t\t{_nft_statement(r)}" for r in rs.rules if r.hook is hook),
            "\t}",
        ]
    return [*lines, "}"]


def render_native(rs: RuleSet, owned: Owned | None = None) -> str:
    """The ``iptables`` flavour's table ``ip natedit`` (an ``nft -f`` script): the
    ownership sets and the claim, settle and guard chains, replacing a table left
    behind atomically."""
    head = [
        "#!/usr/sbin/nft -f",
        f"# natedit rules, iptables flavour: table ip {NFT_TABLE} (the ownership sets, kept",
        "# by the worker, and the chains that claim its GRE); load it before the iptables part",
    ]
    return "\n".join([*head, *_table(rs, owned, queues=False)]) + "\n"


def render_nft(rs: RuleSet, owned: Owned | None = None) -> str:
    """An ``nft -f`` script that (re)creates table ``ip natedit`` atomically, queue
    rules included.

    Needs the nft ``queue`` statement (CONFIG_NFT_QUEUE). Removal is
    ``nft delete table ip natedit``.
    """
    note = _bypass_note(rs)
    head = ["#!/usr/sbin/nft -f", f"# natedit rules, nft flavour; {note[0]}",
            *(f"# {line}" for line in note[1:])]
    return "\n".join([*head, *_table(rs, owned, queues=True)]) + "\n"


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


def install(rs: RuleSet, flavour: Flavour, owned: Owned | None = None) -> Installation:
    """Install ``rs`` with ``owned`` in its sets, replacing anything a previous natedit
    run left behind (its sets too: the call table is the truth)."""
    if not host.have("nft"):
        raise RulesError("natedit needs nftables (the nft command) for table ip "
                         f"{NFT_TABLE}, its ownership sets (Debian: apt-get install nftables)")
    if flavour is Flavour.NFT:
        _remove_iptables(before=None, hooks=tuple(Hook))
        try:
            host.run(["nft", "-f", "-"], stdin=render_nft(rs, owned))
        except host.HostError as exc:
            raise RulesError(
                f"{exc} (the nft queue statement needs CONFIG_NFT_QUEUE: try --flavour iptables)"
            ) from exc
        return Installation(flavour, rs.hooks, None)
    leftovers = iptables_removal(host.run(["iptables-save"]))
    before = None
    if not leftovers and host.iptables_is_nft():
        before = nft_chains(host.nft_ruleset("ip"))
    host.run(["nft", "-f", "-"], stdin=render_native(rs, owned))
    try:
        host.run(
            ["iptables-restore", "--noflush"],
            stdin=_restore_script(_merge(leftovers, iptables_blocks(rs))),
        )
    except BaseException:
        host.run(["nft", "-f", "-"], stdin=NFT_REMOVAL)
        raise
    return Installation(flavour, rs.hooks, before)


def remove(installation: Installation) -> None:
    """Undo ``installation``: the ruleset is as it was before :func:`install`."""
    if installation.flavour is not Flavour.NFT:
        _remove_iptables(installation.before, installation.hooks)
    host.run(["nft", "-f", "-"], stdin=NFT_REMOVAL)


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
