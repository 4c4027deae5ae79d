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
    reason: str


@dataclass(frozen=True, slots=True)
class CallRefused:
    """A new call was not mapped (a limit, or no free public Call ID)."""

    client_address: IPv4Address
    client_call_id: int | None
    server_address: IPv4Address
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    """A new control connection was dropped: the policy's ACL denies its client or server."""

    client_address: IPv4Address
    server_address: IPv4Address
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """Input the core would not accept; the verdict carries the same reason."""

    reason: str
    detail: str


Event = (CallMapped | CallEstablished | CallReleased | CallRefused | ConnectionRefused
         | ProtocolViolation)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    data: bytes | None = None
    """Replacement packet bytes; None means the packet goes out as it came."""
    reason: str | None = None
    """Why a packet was dropped, or passed untouched on purpose."""
    events: tuple[Event, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


ACCEPT = Verdict(Action.ACCEPT)
