"""natedit: a PPTP NAT editor. Public names of the sans-I/O core (:mod:`natedit.core`)."""

from .core import errors, events
from .core.errors import NateditError, PolicyError, ProtocolError
from .core.events import (
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
from .core.policy import Allocation, DisconnectRule, MalformedAction, Policy
from .core.translator import Translator
from .core.wire import Direction, MessageType
from .policyfile import load_policy

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
    "Translator",
    "Verdict",
    "errors",
    "events",
    "load_policy",
]
