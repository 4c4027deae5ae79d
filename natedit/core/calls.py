"""A call and its lifecycle, as data.

Theory of operation
-------------------
A :class:`Call` maps one client Call ID, on one control connection, to a
public Call ID (see :mod:`.table` for the indexes that find it). Its life is
a small state machine, written here once as a table and applied by
:meth:`natedit.core.table.CallTable.apply` and nowhere else:

``TRANSITIONS[(state, direction, message type, outcome)] -> Step(state, release)``

``outcome`` is the Result Code of a reply (:attr:`Outcome.CONNECTED` or
:attr:`Outcome.REFUSED`), :attr:`Outcome.ANY` for other messages. A step with
a ``release`` reason ends the call; one with another state enters it (the
state's timer restarts); one with the same state only touches the call (its
idle timer restarts). A complete message that names a call in a state with no
entry for it changes nothing: the translator counts it
(``unexpected_message``) and lets it go on. A new call starts REQUESTED, where
the message that created it is applied as any other (an Outgoing-Call-Reply
of a client that is a PAC takes it to ESTABLISHED at once).

============  ===========  ===========================================  ==============
state         direction    message (outcome)                            step
============  ===========  ===========================================  ==============
REQUESTED     out          Outgoing/Incoming-Call-Request (it made it)  REQUESTED
REQUESTED     out          Outgoing-Call-Reply (connected)              ESTABLISHED
REQUESTED     out          Incoming-Call-Reply (connected)              INCOMING
REQUESTED     out          Outgoing/Incoming-Call-Reply (refused)       refused_by_client
REQUESTED     in           Outgoing/Incoming-Call-Reply (connected)     ESTABLISHED
REQUESTED     in           Outgoing/Incoming-Call-Reply (refused)       refused_by_server
ESTABLISHED   in           Outgoing/Incoming-Call-Reply (connected)     ESTABLISHED again
ESTABLISHED   in           Outgoing/Incoming-Call-Reply (refused)       refused_by_server
INCOMING      in           Incoming-Call-Connected                      ESTABLISHED
CLOSING       in           Outgoing/Incoming-Call-Reply (connected)     CLOSING
CLOSING       in           Outgoing/Incoming-Call-Reply (refused)       refused_by_server
any but       either       Call-Clear-Request                           CLOSING
CLOSING
CLOSING       either       Call-Clear-Request                           CLOSING
any           either       Call-Disconnect-Notify                       disconnect
any           either       Stop-Control-Connection-Request/Reply        stop
any           in           WAN-Error-Notify, Set-Link-Info              (same state)
============  ===========  ===========================================  ==============

A reply records the server's Call ID first: a second reply to an established
call moves its outbound GRE to the new server Call ID (and is told again), and
a reply that crosses a Call-Clear-Request leaves the call CLOSING but lets
the Call-Disconnect-Notify that follows find it.

Besides messages, a call ends with its control connection (``fin``, ``reset``,
``control_idle``; ``public_address_changed``: the connection's NAT address, which
the edge reads from conntrack, changed under it, as after an uplink failover),
when replaced by a new call with its client Call ID (``replaced``), and when
its timer runs out: :data:`TIMEOUTS` gives each state's clock and release reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from .checksum import address_deltas
from .errors import ReleaseReason
from .events import CallInfo, CallRecord
from .policy import Policy
from .wire import Direction, MessageType

if TYPE_CHECKING:
    from .table import ControlConnection

MT = MessageType
OUT = Direction.OUTBOUND
IN = Direction.INBOUND


class CallState(enum.Enum):
    __hash__ = object.__hash__  # (members are unique: identity, at C speed)

    REQUESTED = "requested"
    """Outgoing-Call-Request seen, waiting for the reply."""
    INCOMING = "incoming"
    """Incoming-Call-Reply seen, waiting for Incoming-Call-Connected."""
    ESTABLISHED = "established"
    CLOSING = "closing"
    """Call-Clear-Request seen, waiting for Call-Disconnect-Notify."""


class Outcome(enum.Enum):
    __hash__ = object.__hash__  # (members are unique: identity, at C speed)

    ANY = "any"
    """A message without a Result Code (or one whose Result Code nothing reads)."""
    CONNECTED = "connected"
    """Outgoing/Incoming-Call-Reply with Result Code 1."""
    REFUSED = "refused"
    """Outgoing/Incoming-Call-Reply with any other Result Code."""


@dataclass(frozen=True, slots=True)
class Step:
    state: CallState | None
    """The state entered (the same one: only touched); None when the call ends."""
    release: ReleaseReason | None = None
    again: bool = False
    """Enter ``state`` again though the call is in it: its timer restarts and its
    event is told again (a new reply to an established call: its server Call ID
    may have changed, and a datapath outside the core must hear it)."""


S = CallState
R = ReleaseReason
ANY, CONNECTED, REFUSED = Outcome.ANY, Outcome.CONNECTED, Outcome.REFUSED
_REPLIES = (MT.OUTGOING_CALL_REPLY, MT.INCOMING_CALL_REPLY)


def _transitions() -> dict[tuple[CallState, Direction, MessageType, Outcome], Step]:
    t: dict[tuple[CallState, Direction, MessageType, Outcome], Step] = {}
    # a new call: the message that made it (the client asks, or answers the server)
    t[(S.REQUESTED, OUT, MT.OUTGOING_CALL_REQUEST, ANY)] = Step(S.REQUESTED)
    t[(S.REQUESTED, OUT, MT.INCOMING_CALL_REQUEST, ANY)] = Step(S.REQUESTED)
    t[(S.REQUESTED, OUT, MT.OUTGOING_CALL_REPLY, CONNECTED)] = Step(S.ESTABLISHED)
    t[(S.REQUESTED, OUT, MT.INCOMING_CALL_REPLY, CONNECTED)] = Step(S.INCOMING)
    for mt in _REPLIES:
        t[(S.REQUESTED, OUT, mt, REFUSED)] = Step(None, R.REFUSED_BY_CLIENT)
        # the server answers
        t[(S.REQUESTED, IN, mt, CONNECTED)] = Step(S.ESTABLISHED)
        t[(S.REQUESTED, IN, mt, REFUSED)] = Step(None, R.REFUSED_BY_SERVER)
        t[(S.ESTABLISHED, IN, mt, CONNECTED)] = Step(S.ESTABLISHED, again=True)
        t[(S.ESTABLISHED, IN, mt, REFUSED)] = Step(None, R.REFUSED_BY_SERVER)
        t[(S.CLOSING, IN, mt, CONNECTED)] = Step(S.CLOSING)  # crossed a Call-Clear-Request
        t[(S.CLOSING, IN, mt, REFUSED)] = Step(None, R.REFUSED_BY_SERVER)
    t[(S.INCOMING, IN, MT.INCOMING_CALL_CONNECTED, ANY)] = Step(S.ESTABLISHED)
    for state in CallState:
        for d in Direction:
            t[(state, d, MT.CALL_CLEAR_REQUEST, ANY)] = Step(S.CLOSING)
            t[(state, d, MT.CALL_DISCONNECT_NOTIFY, ANY)] = Step(None, R.DISCONNECT)
            t[(state, d, MT.STOP_CONTROL_CONNECTION_REQUEST, ANY)] = Step(None, R.STOP)
            t[(state, d, MT.STOP_CONTROL_CONNECTION_REPLY, ANY)] = Step(None, R.STOP)
        t[(state, IN, MT.WAN_ERROR_NOTIFY, ANY)] = Step(state)
        t[(state, IN, MT.SET_LINK_INFO, ANY)] = Step(state)
    return t


TRANSITIONS = _transitions()
"""The call lifecycle (see the module docstring): the only way a call changes state."""


@dataclass(frozen=True, slots=True)
class Timeout:
    idle: bool
    """True: ``call_idle_timeout`` after the last traffic; False: ``request_timeout``
    after the state was entered."""
    release: ReleaseReason


TIMEOUTS: dict[CallState, Timeout] = {
    S.REQUESTED: Timeout(False, R.REQUEST_TIMEOUT),
    S.INCOMING: Timeout(False, R.REQUEST_TIMEOUT),
    S.ESTABLISHED: Timeout(True, R.IDLE),
    S.CLOSING: Timeout(False, R.CLEAR_TIMEOUT),
}
"""Each state's timer: which clock, and why a call whose timer ran out is released."""


class Call:
    """One mapping. Mutable, owned by the table; others get :class:`CallInfo`."""

    __slots__ = (
        "client_call_hi", "client_call_id", "client_ip", "conn", "gre_bytes", "gre_packets",
        "in_csum_delta", "last_seen", "out_csum_delta", "public_address", "public_call_id",
        "public_ip", "released", "server_call_id", "server_ip", "since", "state",
    )

    def __init__(self, conn: ControlConnection, client_call_hi: int,
                 public_address: IPv4Address, public_call_id: int, now: float) -> None:
        self.conn = conn
        self.client_ip = conn.client_ip
        self.server_ip = conn.server_ip
        self.public_address = public_address
        """(The table's one object for this address.)"""
        self.public_ip = public_ip = public_address.packed
        self.client_call_hi = client_call_hi
        self.client_call_id: int | None = None
        self.public_call_id = public_call_id
        self.server_call_id: int | None = None
        self.state = CallState.REQUESTED
        self.since = now
        self.last_seen = now
        self.released = False
        self.gre_packets = [0, 0]
        """GRE packets by Direction (outbound, inbound)."""
        self.gre_bytes = [0, 0]
        # The IP header checksum deltas of the address rewrites are the same for
        # every GRE packet of the call: compute them once (RFC 1624).
        self.in_csum_delta, self.out_csum_delta = address_deltas(public_ip, self.client_ip)

    def info(self) -> CallInfo:
        conn = self.conn
        return CallInfo(
            conn.client_address, self.client_call_id, conn.server_address,
            self.server_call_id, self.public_address, self.public_call_id,
            self.state.value,
        )

    def record(self) -> CallRecord:
        conn = self.conn
        return CallRecord(
            conn.client_address, conn.client_port, conn.server_address,
            conn.server_port, self.public_address, self.public_call_id,
            self.client_call_hi, self.client_call_id, self.server_call_id, self.state.value,
        )

    def expires(self, policy: Policy) -> float:
        if TIMEOUTS[self.state].idle:
            return self.last_seen + policy.call_idle_timeout
        return self.since + policy.request_timeout
