"""Who may set up what: the policy's ACLs and the per-client new-call rate.

Asked only where something new starts: a control connection natedit has not
seen (:meth:`Admission.connection_refusal`), and a segment that carries new
calls (:meth:`Admission.acl_refusal`, :meth:`Admission.rate_refusal`, then
:meth:`Admission.admit` once the segment is let through). Never on the
per-packet GRE path. Sans-I/O: the clock is the ``now`` the translator got.

The rate limit is a token bucket per private client address: it holds at
most ``new_calls_burst`` tokens, gains ``new_calls_per_second`` a second, and
every new call takes one. A refused request takes none, so a client's TCP
retransmissions of it do not drain its bucket: the retransmission that comes
after the bucket has refilled goes through.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from .errors import Refusal
from .policy import ANYWHERE, Policy

BUCKETS_PRUNE_AT = 4096
"""Buckets kept before full ones (of clients idle long enough) are forgotten."""


class Admission:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._open = _acl_open(policy)
        self._buckets: dict[bytes, tuple[float, float]] = {}
        """Client address -> (tokens, time of that count)."""
        self._prune_at = BUCKETS_PRUNE_AT

    def set_policy(self, policy: Policy) -> None:
        """New ACLs and rates from now on; tokens carry over (capped by the new burst)."""
        self.policy = policy
        self._open = _acl_open(policy)
        if policy.new_calls_per_second <= 0:
            self._buckets.clear()

    def connection_refusal(self, client_ip: bytes, server_ip: bytes, *,
                           gateway: bool = False) -> Refusal | None:
        """Why a new control connection from ``client_ip`` to ``server_ip`` may not be
        tracked (and its packets go no further), or None."""
        return self.acl_refusal(client_ip, server_ip, gateway=gateway)

    def acl_refusal(self, client_ip: bytes, server_ip: bytes, *,
                    gateway: bool = False) -> Refusal | None:
        """One of :data:`~natedit.core.errors.ACL_REFUSALS`, or None. ``gateway``: the
        client is the gateway itself (on a public address), which the client ACL does
        not name: only the server ACL applies."""
        if self._open:
            return None
        p = self.policy
        if not gateway and not p.client_allowed(IPv4Address(client_ip)):
            return Refusal.CLIENT_DENIED
        if not p.server_allowed(IPv4Address(server_ip)):
            return Refusal.SERVER_DENIED
        return None

    def rate_refusal(self, client_ip: bytes, n: int, now: float) -> Refusal | None:
        """``rate_limited`` when ``client_ip`` has fewer than ``n`` tokens at ``now``."""
        if self.policy.new_calls_per_second <= 0:
            return None
        return Refusal.RATE_LIMITED if self._tokens(client_ip, now) < n else None

    def admit(self, client_ip: bytes, n: int, now: float) -> None:
        """``n`` new calls of ``client_ip`` were let through at ``now``."""
        if self.policy.new_calls_per_second <= 0:
            return
        self._buckets[client_ip] = (self._tokens(client_ip, now) - n, now)
        if len(self._buckets) >= self._prune_at:
            self._prune(now)

    def _tokens(self, client_ip: bytes, now: float) -> float:
        p = self.policy
        burst = float(p.new_calls_burst)
        held = self._buckets.get(client_ip)
        if held is None:
            return burst
        tokens, since = held
        return min(burst, tokens + max(0.0, now - since) * p.new_calls_per_second)

    def _prune(self, now: float) -> None:
        burst = float(self.policy.new_calls_burst)
        for client_ip in [c for c in self._buckets if self._tokens(c, now) >= burst]:
            del self._buckets[client_ip]
        self._prune_at = max(BUCKETS_PRUNE_AT, 2 * len(self._buckets))


def _acl_open(p: Policy) -> bool:
    """The default ACL: everyone may reach every server (no address to look at)."""
    return (p.clients_allow == ANYWHERE and not p.clients_deny
            and p.servers_allow == ANYWHERE and not p.servers_deny)
