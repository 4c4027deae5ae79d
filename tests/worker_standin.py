"""A stand-in translator, run by the worker's namespace test in place of the real one.

``python tests/worker_standin.py POLICY.yaml READY_FILE`` runs ``natedit.worker.run``
with it. It prints one line per packet (``standin: OUTBOUND proto=6 10.0.0.2->...``),
rewrites GRE addresses the way natedit does (outbound: public source; inbound:
destination 10.0.0.2) without looking at Call IDs, passes GRE whose payload says
``leak`` untouched (for the POSTROUTING safety net), raises on ``raise`` (for the
worker's error path), and fires one timer 0.3 s after start. Its call table
(``table``) owns the GRE the test sends: inbound to public Call ID 9 from the
server, outbound with server Call ID 7 from 10.0.0.2 (natedit claims only GRE
its call table owns: natedit.owned).
"""

from __future__ import annotations

import sys
import time
from ipaddress import IPv4Address

from natedit import logs, worker
from natedit.core.checksum import internet_checksum
from natedit.core.errors import ReleaseReason
from natedit.core.events import ACCEPT, Action, CallInfo, CallReleased, Event, Verdict
from natedit.core.policy import Policy
from natedit.core.wire import IPPROTO_GRE, Direction
from natedit.policyfile import load_policy

CLIENT = IPv4Address("10.0.0.2")
SERVER = IPv4Address("198.51.100.2")
OWNED_IN_CALL_ID = 9
OWNED_OUT_CALL_ID = 7
TIMER_CALL = CallInfo(
    CLIENT, 1, IPv4Address("198.51.100.2"), 2, IPv4Address("198.51.100.1"), 3, "established"
)


class Table:
    """The keys of a call table, as natedit.owned reads them."""

    def __init__(self, public: bytes) -> None:
        self.by_public: dict[tuple[bytes, bytes, int], object] = {
            (public, SERVER.packed, OWNED_IN_CALL_ID): object()}
        self.by_server: dict[tuple[bytes, bytes, int], object] = {
            (CLIENT.packed, SERVER.packed, OWNED_OUT_CALL_ID): object()}


class StandIn:
    def __init__(self, policy: Policy) -> None:
        assert policy.public_address is not None
        self.public = policy.public_address.packed
        self.table = Table(self.public)
        self.deadline: float | None = time.monotonic() + 0.3

    def handle_packet(self, data: bytes, direction: Direction, now: float) -> Verdict:
        src, dst = IPv4Address(data[12:16]), IPv4Address(data[16:20])
        print(f"standin: {direction.name} proto={data[9]} {src}->{dst}", file=sys.stderr)
        if b"raise" in data:
            raise RuntimeError("stand-in told to fail")
        if data[9] != IPPROTO_GRE or b"leak" in data:
            return ACCEPT
        new = bytearray(data)
        if direction is Direction.OUTBOUND:
            new[12:16] = self.public
        else:
            new[16:20] = CLIENT.packed
        ihl = (new[0] & 0x0F) * 4
        new[10:12] = b"\0\0"
        new[10:12] = internet_checksum(new[:ihl]).to_bytes(2, "big")
        return Verdict(Action.ACCEPT, bytes(new))

    def next_deadline(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> list[Event]:
        self.deadline = None
        return [CallReleased(TIMER_CALL, ReleaseReason.IDLE)]


if __name__ == "__main__":
    logs.setup("info")
    policy = load_policy(sys.argv[1])
    sys.exit(worker.run(policy, ready_file=sys.argv[2], make_translator=StandIn))
