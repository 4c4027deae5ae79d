"""The one error family, and every reason the core gives, as enums.

Every parse failure in the core raises :class:`ProtocolError` (never
``struct.error``, ``IndexError`` or ``ValueError``). Its ``reason`` is a
:class:`Malformed` member (or :attr:`PassReason.NOT_PPTP_GRE` from
:func:`natedit.core.wire.parse_gre`): the label under which the edge counts
the verdict.

The reason enums are the closed sets the edges count by; their values are the
labels natedit has always exported (``StrEnum``: a member *is* its string).
:mod:`natedit.metrics` exports each member at 0 from the start, from these
enums; nothing lists them a second time.

* :class:`Malformed` - input that does not parse or fails validation: dropped
  (policy ``malformed: drop``) or passed (``malformed: pass``);
* :class:`DropReason` - every other drop, the refusals included
  (``refused:<Refusal>``, :meth:`Refusal.drop`);
* :class:`PassReason` - deliberate pass-throughs of packets, or of Call ID
  fields left as they came (counted, the packet goes on);
* :class:`Refusal` - why a new call (or, for the ACL ones, a new control
  connection) was not let through;
* :class:`ReleaseReason` - why a mapping ended;
* :class:`RestoreOutcome` - what became of one record put back after a restart.
"""

from __future__ import annotations

import enum


class NateditError(Exception):
    """Base class of every error natedit raises on purpose."""


class Malformed(enum.StrEnum):
    """Why bytes from the network do not parse (:class:`ProtocolError` reasons)."""

    SHORT_IP = "short_ip"
    NOT_IPV4 = "not_ipv4"
    BAD_IP_HEADER = "bad_ip_header"
    SHORT_TCP = "short_tcp"
    BAD_TCP_HEADER = "bad_tcp_header"
    SHORT_GRE = "short_gre"
    SHORT_HEADER = "short_header"
    BAD_PPTP_TYPE = "bad_pptp_type"
    BAD_COOKIE = "bad_cookie"
    BAD_MESSAGE_TYPE = "bad_message_type"
    BAD_LENGTH = "bad_length"
    LENGTH_MISMATCH = "length_mismatch"


class Refusal(enum.StrEnum):
    """Why new calls were not mapped, or a new control connection not tracked."""

    NOT_STARTED = "not_started"
    """A connection seen from its SYN asked for a call before Start-Control-Connection."""
    CLIENT_DENIED = "client_denied"
    SERVER_DENIED = "server_denied"
    CLIENT_LIMIT = "client_limit"
    TABLE_FULL = "table_full"
    POOL_EXHAUSTED = "pool_exhausted"
    RATE_LIMITED = "rate_limited"
    NOT_PUBLIC = "not_public"
    """The control connection was NATed to an address that is none of the policy's
    public addresses (or not NATed at all): its calls would be mapped to a wrong one."""

    @property
    def drop(self) -> DropReason:
        """The verdict reason of a packet refused for this reason: ``refused:<reason>``."""
        return DropReason(f"refused:{self.value}")


ACL_REFUSALS = (Refusal.CLIENT_DENIED, Refusal.SERVER_DENIED)
"""The refusals of the ACL: the only ones a new control connection gets."""


class DropReason(enum.StrEnum):
    """Why a packet was dropped (besides :class:`Malformed` input)."""

    GAP = "gap"
    NO_CALL = "no_call"
    FOREIGN_CALL_ID = "foreign_call_id"
    FRAGMENT = "fragment"
    HISTORY_REWRITTEN = "history_rewritten"
    """A retransmission whose bytes differ from the unacknowledged ones inspected."""
    SPLIT_CALL_ID = "split_call_id"
    """The rest of a Call ID field cut between segments whose first byte left as a
    high byte the whole value does not keep: it would leave half-rewritten."""
    TOO_MANY_CONNECTIONS = "too_many_connections"
    CLIENT_CONNECTION_LIMIT = "client_connection_limit"
    REFUSED_NOT_STARTED = "refused:not_started"
    REFUSED_CLIENT_DENIED = "refused:client_denied"
    REFUSED_SERVER_DENIED = "refused:server_denied"
    REFUSED_CLIENT_LIMIT = "refused:client_limit"
    REFUSED_TABLE_FULL = "refused:table_full"
    REFUSED_POOL_EXHAUSTED = "refused:pool_exhausted"
    REFUSED_RATE_LIMITED = "refused:rate_limited"
    REFUSED_NOT_PUBLIC = "refused:not_public"
    """(``refused:<reason>``: one per :class:`Refusal`; a unit test holds them equal.)"""


class PassReason(enum.StrEnum):
    """Why a packet, or a Call ID field in it, went on as it came, on purpose."""

    UNSYNCED = "unsynced"
    DUPLICATE_SYN = "duplicate_syn"
    """A SYN (SYN-ACK) with the initial sequence number its stream began with."""
    NOT_OURS = "not_ours"
    NOT_PPTP_GRE = "not_pptp_gre"
    UNKNOWN_CALL_ID = "unknown_call_id"
    SPLIT_CALL_ID_UNDECIDED = "split_call_id_undecided"
    UNEXPECTED_MESSAGE = "unexpected_message"
    """(Counted per message.) A control message naming a call in a state with no step
    for it (:data:`natedit.core.calls.TRANSITIONS`): a second reply, an
    Incoming-Call-Connected for a call not waiting for one; the call is unchanged."""


Reason = Malformed | DropReason | PassReason
"""Any reason a :class:`~natedit.core.events.Verdict` carries."""


class ReleaseReason(enum.StrEnum):
    """Why a mapping ended."""

    DISCONNECT = "disconnect"
    STOP = "stop"
    FIN = "fin"
    RESET = "reset"
    IDLE = "idle"
    """An established call saw no GRE nor control traffic for ``call_idle_timeout``."""
    REQUEST_TIMEOUT = "request_timeout"
    """A call request got no reply (nor Incoming-Call-Connected) in ``request_timeout``."""
    CLEAR_TIMEOUT = "clear_timeout"
    """A Call-Clear-Request got no Call-Disconnect-Notify in ``request_timeout``."""
    CONTROL_IDLE = "control_idle"
    REFUSED_BY_SERVER = "refused_by_server"
    REFUSED_BY_CLIENT = "refused_by_client"
    REPLACED = "replaced"
    PUBLIC_ADDRESS_CHANGED = "public_address_changed"
    """The control connection's NAT address changed (an uplink failover): its calls,
    mapped to the old one, end (the server sees the connection from another address)."""


class RestoreOutcome(enum.StrEnum):
    """What became of one record put back after a restart (``Translator.restore``)."""

    RESTORED = "restored"
    PUBLIC_ADDRESS = "public_address"
    CLIENT_ADDRESS = "client_address"
    SERVER_ADDRESS = "server_address"
    INVALID = "invalid"
    DUPLICATE = "duplicate"
    CLIENT_LIMIT = "client_limit"
    TABLE_FULL = "table_full"
    TOO_MANY_CONNECTIONS = "too_many_connections"


class ProtocolError(NateditError):
    """Bytes from the network that natedit cannot accept."""

    def __init__(self, reason: Malformed | PassReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else str(reason))


class PolicyError(NateditError):
    """A policy that cannot be used; ``problems`` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))
