"""What the core hands back: a verdict per packet, and events.

A :class:`Verdict` says what to do with one packet: accept it unchanged,
accept these new bytes instead, or drop it. ``reason`` names why a packet
was dropped or deliberately passed untouched; the edges count by it.
Events report changes of the call table and anomalies worth a log line.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address

from .errors import Malformed, PassReason, Reason, Refusal, ReleaseReason


class Action(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class CallInfo:
    """A snapshot of one call, as events and listings carry it."""

    client_address: IPv4Address
    client_call_id: int | None
    server_address: IPv4Address
    server_call_id: int | None
    public_address: IPv4Address
    public_call_id: int
    state: str


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What it takes to put one live call back after a restart (``Translator.restore``).

    :class:`CallInfo` plus what the table needs to rebuild the call's control
    connection and keep its invariants. Timers and GRE counters are not part
    of it: a restored call's idle time starts at the restore.
    """

    client_address: IPv4Address
    client_port: int
    server_address: IPv4Address
    server_port: int
    public_address: IPv4Address
    public_call_id: int
    client_call_hi: int
    """The client Call ID's high byte, known before the whole Call ID (a split field)."""
    client_call_id: int | None
    server_call_id: int | None
    state: str


@dataclass(frozen=True, slots=True)
class GreRoute:
    """How to translate one established call's GRE, for a datapath outside the core
    (:mod:`natedit.fastpath`): inbound, (public address, server, public Call ID) ->
    (client, client Call ID); outbound, when ``outbound`` (the call owns that key),
    (client, server, server Call ID) -> public address. Addresses packed."""

    public_ip: bytes
    server_ip: bytes
    public_call_id: int
    client_ip: bytes
    client_call_id: int
    server_call_id: int
    outbound: bool


@dataclass(frozen=True, slots=True)
class CallMapped:
    """A client Call ID got a public Call ID."""

    call: CallInfo


@dataclass(frozen=True, slots=True)
class CallEstablished:
    """The peer accepted the call (Result Code 1, or Incoming-Call-Connected)."""

    call: CallInfo


@dataclass(frozen=True, slots=True)
class CallReleased:
    """A mapping ended; ``reason`` says why (clear, disconnect, refused, stop, ...)."""

    call: CallInfo
    reason: ReleaseReason


@dataclass(frozen=True, slots=True)
class CallRefused:
    """A new call was not mapped (a limit, or no free public Call ID)."""

    client_address: IPv4Address
    client_call_id: int | None
    server_address: IPv4Address
    reason: Refusal


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    """A new control connection was dropped: the policy's ACL denies its client or server."""

    client_address: IPv4Address
    server_address: IPv4Address
    reason: Refusal


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """Input the core would not accept; the verdict carries the same reason."""

    reason: Malformed | PassReason
    detail: str


Event = (CallMapped | CallEstablished | CallReleased | CallRefused | ConnectionRefused
         | ProtocolViolation)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    data: bytes | None = None
    """Replacement packet bytes; None means the packet goes out as it came."""
    reason: Reason | None = None
    """Why a packet was dropped, or passed untouched on purpose."""
    events: tuple[Event, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


ACCEPT = Verdict(Action.ACCEPT)
