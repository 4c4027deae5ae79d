"""natedit: a PPTP NAT editor. The public API of the sans-I/O core (:mod:`natedit.core`).

The edges (worker, metrics, state, rules, CLI, ...) import the core through these
names only (``tests/unit/test_imports.py`` holds them to it); the call table's
public listing is :class:`natedit.core.table.CallTable`'s read methods
(``calls``, ``connection_count``, ``client_count``, ``ids_in_use``, ``blocks_in_use``).
"""

from .core import errors, events, wire
from .core.calls import CallState
from .core.errors import (
    ACL_REFUSALS,
    DropReason,
    Malformed,
    NateditError,
    PassReason,
    PolicyError,
    ProtocolError,
    Reason,
    Refusal,
    ReleaseReason,
    RestoreOutcome,
)
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
from .core.policy import (
    LOG_LEVELS,
    Allocation,
    Datapath,
    DisconnectRule,
    LogFormat,
    MalformedAction,
    Policy,
    WorkerDown,
)
from .core.stats import Stats
from .core.translator import Translator
from .core.wire import IPPROTO_GRE, PPTP_PORT, Direction, MessageType
from .policyfile import load_policy

__all__ = [
    "ACCEPT",
    "ACL_REFUSALS",
    "IPPROTO_GRE",
    "LOG_LEVELS",
    "PPTP_PORT",
    "Action",
    "Allocation",
    "CallEstablished",
    "CallInfo",
    "CallMapped",
    "CallRecord",
    "CallRefused",
    "CallReleased",
    "CallState",
    "ConnectionRefused",
    "Datapath",
    "Direction",
    "DisconnectRule",
    "DropReason",
    "Event",
    "GreRoute",
    "LogFormat",
    "Malformed",
    "MalformedAction",
    "MessageType",
    "NateditError",
    "PassReason",
    "Policy",
    "PolicyError",
    "ProtocolError",
    "ProtocolViolation",
    "Reason",
    "Refusal",
    "ReleaseReason",
    "RestoreOutcome",
    "Stats",
    "Translator",
    "Verdict",
    "WorkerDown",
    "errors",
    "events",
    "load_policy",
    "wire",
]
