"""The policy: every tunable of the editor, with a built-in default for each.

A frozen value object and its types. The core reads it; the edges load it
from YAML (:mod:`natedit.policyfile`) and resolve what needs the host (the
public address of an interface or of the default route) before handing it to
the core.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

RFC1918 = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
ANYWHERE = (IPv4Network("0.0.0.0/0"),)

MAX_TIMEOUT = 7 * 86400.0
"""Longest timeout accepted (a week): anything longer is a typo, or infinity."""
MAX_RATE = 1_000_000.0
"""Highest new-calls-per-second limit accepted; 0 turns the limit off."""
MAX_CALLS = 65535
"""Highest call limit (and burst) accepted: there are no more public Call IDs."""
MAX_CONTROL_CONNECTIONS = 1_000_000
"""Highest control-connection limit accepted (each costs memory)."""


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


class Datapath(enum.Enum):
    USERSPACE = "userspace"
    """Every GRE packet goes through the queues to the worker."""
    KERNEL = "kernel"
    """GRE of established calls is translated by a tc-BPF program whose maps the
    worker keeps (:mod:`natedit.fastpath`); the rest still goes through the queues."""


class WorkerDown(enum.Enum):
    DROP = "drop"
    """Fail closed: with no worker bound, queued PPTP packets are dropped."""
    PASS = "pass"
    """The TCP 1723 queue rules get ``--queue-bypass``: with no worker bound the
    control connection flows untranslated (conntrack and the operator's NAT)."""


class LogFormat(enum.Enum):
    TEXT = "text"
    """``natedit: message`` lines (events as logfmt ``key=value`` pairs)."""
    JSON = "json"
    """One JSON object per line: time, level, message."""


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Policy:
    public_address: IPv4Address | None = None
    """Address the clients share on the outside; None = that of ``public_interface``.
    With several (a list in the policy file) the first: the one a call gets when the
    edge cannot say which its control connection was NATed to (``natedit replay``)."""
    other_public_addresses: tuple[IPv4Address, ...] = ()
    """The rest of that list: more addresses the clients are NATed to (several uplinks,
    an SNAT pool, per-network SNAT). Each call gets the one its control connection was
    NATed to (the worker reads it from conntrack); see :attr:`public_addresses`."""
    public_interface: str | None = None
    """Interface whose primary address is the public one; None (and no
    ``public_address``) = the interface of the default route."""
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
    call_id_node: int = 1
    """This gateway's share of the range in a pair: it allocates only IDs with
    ``id % call_id_nodes == call_id_node - 1`` (node 1 of 2: even IDs), so two
    actives (split brain) never give one public Call ID twice."""
    call_id_nodes: int = 1
    """Gateways sharing the range (1: all of it is this one's)."""
    max_calls_per_client: int = 256
    """Live calls one private address may hold; more are refused."""
    max_calls: int = 65535
    """Live calls in all; more are refused."""
    max_control_connections: int = 16384
    """Tracked control connections in all; more are dropped (memory bound)."""
    new_calls_per_second: float = 0.0
    """New calls one private address may set up per second (token bucket); 0 = no limit."""
    new_calls_burst: int = 10
    """Bucket size of that limit: new calls a client may set up at once."""
    request_timeout: float = 60.0
    """Seconds a call may wait for its Outgoing/Incoming-Call-Reply/Connected."""
    call_idle_timeout: float = 300.0
    """Seconds without GRE or control traffic after which a call is released."""
    control_idle_timeout: float = 300.0
    """Seconds without traffic after which a control connection is forgotten."""
    clients_allow: tuple[IPv4Network, ...] = ANYWHERE
    """Clients that may use PPTP (the most specific network of allow and deny decides)."""
    clients_deny: tuple[IPv4Network, ...] = ()
    """Clients that may not use PPTP."""
    servers_allow: tuple[IPv4Network, ...] = ANYWHERE
    """Servers clients may reach."""
    servers_deny: tuple[IPv4Network, ...] = ()
    """Servers clients may not reach."""
    malformed: MalformedAction = MalformedAction.DROP
    """What a control message that fails validation gets."""
    disconnect_rule: DisconnectRule = DisconnectRule.CLIENT
    """What natedit writes into an inbound Call-Disconnect-Notify's Call ID."""
    datapath: Datapath = Datapath.USERSPACE
    """Where GRE of established calls is translated: userspace or kernel."""
    metrics_listen: str = "127.0.0.1:9723"
    """host:port of the Prometheus endpoint (loopback by default)."""
    metrics_call_series: int = 10000
    """Most per-call series the mapping-table metric exports; the rest is counted."""
    on_worker_down: WorkerDown = WorkerDown.DROP
    """What the queue rules do with PPTP while no worker is bound: drop or pass."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_format: LogFormat = LogFormat.TEXT
    """text or json."""

    @property
    def public_addresses(self) -> tuple[IPv4Address, ...]:
        """Every public address, the first one first (none while it is unresolved)."""
        if self.public_address is None:
            return self.other_public_addresses
        return (self.public_address, *self.other_public_addresses)

    def with_public_address(self, address: IPv4Address) -> Policy:
        """The first public address resolved (the others stay)."""
        return dataclasses.replace(self, public_address=address)

    def owns_call_id(self, call_id: int) -> bool:
        """Whether ``call_id`` is in this gateway's share (``call_id_node``)."""
        return self.call_id_nodes <= 1 or call_id % self.call_id_nodes == self.call_id_node - 1

    def share_size(self, first: int, last: int) -> int:
        """How many IDs of ``first..last`` are in this gateway's share."""
        m, r = max(1, self.call_id_nodes), (self.call_id_node - 1) % max(1, self.call_id_nodes)
        return max(0, (last - r) // m - (first - 1 - r) // m)

    def is_inside(self, address: IPv4Address) -> bool:
        return any(address in net for net in self.inside_networks)

    def client_allowed(self, address: IPv4Address) -> bool:
        """Whether ``address`` may use PPTP: see :func:`acl_allows`."""
        return acl_allows(address, self.clients_allow, self.clients_deny)

    def server_allowed(self, address: IPv4Address) -> bool:
        return acl_allows(address, self.servers_allow, self.servers_deny)


def acl_allows(address: IPv4Address, allow: tuple[IPv4Network, ...],
               deny: tuple[IPv4Network, ...]) -> bool:
    """The most specific network containing ``address`` decides; in neither list: denied.

    A loaded policy never has one network in both lists; should a Policy built in
    Python have one, deny wins.
    """
    best_allow = max((n.prefixlen for n in allow if address in n), default=-1)
    best_deny = max((n.prefixlen for n in deny if address in n), default=-1)
    return best_allow > best_deny
