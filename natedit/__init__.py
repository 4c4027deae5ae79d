"""natedit: a PPTP NAT editor. Public names of the sans-I/O core."""

from ._errors import NateditError, PolicyError, ProtocolError
from ._events import (
    ACCEPT,
    Action,
    CallEstablished,
    CallInfo,
    CallMapped,
    CallRecord,
    CallRefused,
    CallReleased,
    ConnectionRefused,
    Event,
    GreRoute,
    ProtocolViolation,
    Verdict,
)
from ._policy import Allocation, DisconnectRule, MalformedAction, Policy, load_policy
from ._wire import Direction, MessageType

__all__ = [
    "ACCEPT",
    "Action",
    "Allocation",
    "CallEstablished",
    "CallInfo",
    "CallMapped",
    "CallRecord",
    "CallRefused",
    "CallReleased",
    "ConnectionRefused",
    "Direction",
    "DisconnectRule",
    "Event",
    "GreRoute",
    "MalformedAction",
    "MessageType",
    "NateditError",
    "Policy",
    "PolicyError",
    "ProtocolError",
    "ProtocolViolation",
    "Verdict",
    "load_policy",
]
