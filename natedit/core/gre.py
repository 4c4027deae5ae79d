"""Enhanced GRE: the one rewrite, its shortcut, and the routes a datapath outside the core keeps.

Theory of operation
-------------------
Inbound GRE carries the public Call ID: it is matched on (public address,
server, public Call ID) and gets the client's address and Call ID. Outbound GRE
carries the server's Call ID: it is matched on (client, server, server Call
ID) and gets the public source address. Both rewrites keep the length and
adjust the IP header checksum by the call's precomputed delta (RFC 1624): the
GRE header has no checksum of its own in PPTP.

:meth:`Gre.inbound` and :meth:`Gre.outbound` are that lookup, rewrite and count,
written once (:meth:`Gre.count` is the one "touch the call", also for the kernel
datapath's counts). Two ways lead to them:

* :meth:`Gre.decide`, the full path of ``handle_packet``, which gives every
  other packet its reason (``not_ours``, ``fragment``, ``short_gre``,
  ``not_pptp_gre``, ``no_call``);
* the same two called without an IP header length: the shortcut the queue
  worker tries first (``Translator.gre_in_fast``/``gre_out_fast``), which takes
  only the packet that is the point of a running call (a
  20-byte IP header, no fragment, the total length equal to the bytes, the
  usual enhanced GRE flags: :data:`FAST_GRE`) and declines (None) anything else,
  which then goes to the full path. A property test holds the two to the same
  bytes, counters and timers (``tests/unit/test_gre_fast.py``).

The kernel datapath (:mod:`natedit.fastpath`) translates established calls'
GRE itself from :meth:`Gre.route`; what it counted comes back through
:meth:`Gre.note`, the same count as a packet here.
"""

from __future__ import annotations

import struct

from .calls import Call, CallState
from .errors import DropReason, Malformed, PassReason, ProtocolError, Reason
from .events import GreRoute
from .stats import Stats
from .table import CallTable
from .wire import (
    ENHANCED_GRE_MASK,
    ENHANCED_GRE_VALUE,
    GRE_ACK_BIT,
    GRE_CALL_ID_AT,
    GRE_HEADER_LEN,
    GRE_SEQ_BIT,
    IPPROTO_GRE,
    Direction,
)

_IN_HEAD = struct.Struct("!10sH4s4s6sH")
"""A 20-byte IP header to the checksum, checksum, source, destination; GRE to the
Call ID, Call ID."""
_OUT_HEAD = struct.Struct("!10sH4s")
_FAST = struct.Struct("!HH2xHxBH4s4sI2xH")
"""The shortcut's one read of a 28-byte head: version and header length with the TOS,
total length, flags and fragment offset, protocol, checksum, source, destination, the
first four GRE bytes, Call ID."""
_FULL20 = struct.Struct("!10xH4s4s6xH")
"""The full path's read of a 20-byte IP header's packet (checked already): checksum,
source, destination, Call ID."""
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IN, _OUT = Direction.INBOUND, Direction.OUTBOUND
_ROUTED = (CallState.ESTABLISHED, CallState.CLOSING)

FAST_GRE = frozenset(ENHANCED_GRE_VALUE | s | a for s in (0, GRE_SEQ_BIT)
                     for a in (0, GRE_ACK_BIT))
"""The first four GRE bytes the shortcut takes (enhanced GRE, with or without a
sequence and an acknowledgement number, no other flag); other valid ones go the
full way."""


class Gre:
    """GRE of the calls in ``table``, counted in ``stats``."""

    def __init__(self, table: CallTable, stats: Stats, publics: frozenset[bytes]) -> None:
        self.table = table
        self.stats = stats
        self.publics = publics
        """The policy's public addresses (packed): inbound GRE to any other is not ours."""
        self._by_public = table.by_public
        self._by_server = table.by_server

    # -- the one rewrite -------------------------------------------------------------

    def inbound(self, data: bytes, now: float, ihl: int = 0) -> bytes | None:
        """The packet for the client, or None: no call of the public Call ID.

        ``ihl`` 0 is the shortcut: only the usual packet (:data:`FAST_GRE`, a 20-byte
        IP header, no fragment, the total length equal to the bytes), None for any
        other, which then takes the full path (:meth:`decide`, which checked it and
        gives its IP header length).
        """
        n = len(data)
        if not ihl:
            if n < 28:
                return None
            vt, total, frag, proto, csum, src, dst, gre, call_id = _FAST.unpack_from(data)
            if (vt >> 8 != 0x45 or total != n or frag & 0x3FFF or proto != IPPROTO_GRE
                    or gre not in FAST_GRE):
                return None
            ihl = 20
        elif ihl == 20:
            csum, src, dst, call_id = _FULL20.unpack_from(data)
        else:
            csum, src, dst = data[10] << 8 | data[11], data[12:16], data[16:20]
            at = ihl + GRE_CALL_ID_AT
            call_id = data[at] << 8 | data[at + 1]
        call = self._by_public.get((dst, src, call_id))
        if call is None:
            return None
        cid = call.client_call_id
        if cid is None:
            return None
        c = (~csum & 0xFFFF) + call.in_csum_delta  # RFC 1624 eqn. 3, the call's delta
        c = ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF  # (the delta is folded: one fold)
        if ihl == 20:
            out = _IN_HEAD.pack(data[:10], c, src, call.client_ip, data[20:26], cid) + data[28:]
        else:
            at = ihl + GRE_CALL_ID_AT
            out = b"".join((data[:10], _U16.pack(c), src, call.client_ip, data[20:at],
                            _U16.pack(cid), data[at + 2:]))
        call.last_seen = now  # (the one per-packet count: Gre.count's, inlined for speed)
        call.gre_packets[1] += 1
        call.gre_bytes[1] += n
        stats = self.stats
        stats.gre_packets[1] += 1
        stats.gre_bytes[1] += n
        return out

    def outbound(self, data: bytes, now: float, ihl: int = 0) -> bytes | None:
        """The packet with the public source address, or None: no call of the server's
        Call ID. ``ihl`` 0 is the shortcut, as for :meth:`inbound`."""
        n = len(data)
        if not ihl:
            if n < 28:
                return None
            vt, total, frag, proto, csum, src, dst, gre, call_id = _FAST.unpack_from(data)
            if (vt >> 8 != 0x45 or total != n or frag & 0x3FFF or proto != IPPROTO_GRE
                    or gre not in FAST_GRE):
                return None
            ihl = 20
        elif ihl == 20:
            csum, src, dst, call_id = _FULL20.unpack_from(data)
        else:
            csum, src, dst = data[10] << 8 | data[11], data[12:16], data[16:20]
            at = ihl + GRE_CALL_ID_AT
            call_id = data[at] << 8 | data[at + 1]
        call = self._by_server.get((src, dst, call_id))
        if call is None:
            return None
        c = (~csum & 0xFFFF) + call.out_csum_delta
        c = ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF  # (the delta is folded: one fold)
        out = _OUT_HEAD.pack(data[:10], c, call.public_ip) + data[16:]
        call.last_seen = now  # (as in inbound)
        call.gre_packets[0] += 1
        call.gre_bytes[0] += n
        stats = self.stats
        stats.gre_packets[0] += 1
        stats.gre_bytes[0] += n
        return out

    def count(self, call: Call, d: Direction, packets: int, nbytes: int, now: float) -> None:
        """GRE of ``call`` translated (here or by the kernel): its counters, the totals,
        and its idle timer restarted at ``now``."""
        call.gre_packets[d] += packets
        call.gre_bytes[d] += nbytes
        if now > call.last_seen:
            call.last_seen = now
        stats = self.stats
        stats.gre_packets[d] += packets
        stats.gre_bytes[d] += nbytes

    # -- the full path and the shortcut ----------------------------------------------

    def decide(self, data: bytes, ihl: int, d: Direction,
               now: float) -> bytes | Reason:
        """The packet's new bytes, or the reason it is passed or dropped (a PassReason:
        accepted as it came)."""
        if d is _IN and data[16:20] not in self.publics:
            return PassReason.NOT_OURS
        if (data[6] << 8 | data[7]) & 0x3FFF:  # no GRE header to read in most of them
            return DropReason.FRAGMENT
        if len(data) < ihl + GRE_HEADER_LEN:
            raise ProtocolError(Malformed.SHORT_GRE,
                                f"{len(data) - ihl} bytes after the IP header")
        if _U32.unpack_from(data, ihl)[0] & ENHANCED_GRE_MASK != ENHANCED_GRE_VALUE:
            return PassReason.NOT_PPTP_GRE
        out = self.inbound(data, now, ihl) if d is _IN else self.outbound(data, now, ihl)
        return DropReason.NO_CALL if out is None else out

    # -- routes for a datapath outside the core --------------------------------------

    def route(self, call: Call) -> GreRoute | None:
        """How to translate ``call``'s GRE, or None: not established (nor closing) with
        both Call IDs known, or a call of the gateway's own client (its client address is
        a public one: its GRE is delivered locally, which a datapath that redirects to an
        interface cannot do; it stays here)."""
        if (call.state not in _ROUTED or call.client_call_id is None
                or call.server_call_id is None or call.client_ip in self.publics):
            return None
        owns = self._by_server.get((call.client_ip, call.server_ip,
                                    call.server_call_id)) is call
        return GreRoute(call.public_ip, call.server_ip, call.public_call_id, call.client_ip,
                        call.client_call_id, call.server_call_id, owns)

    def note(self, key: tuple[bytes, bytes, int], d: Direction, packets: int, nbytes: int,
             now: float) -> None:
        """Count GRE translated outside the core for the call ``key`` names (public
        address, server, public Call ID): the totals always, the call's own counters
        and idle timer while it lives."""
        if packets <= 0:
            return
        call = self._by_public.get(key)
        if call is not None:
            self.count(call, d, packets, nbytes, now)
        else:
            self.stats.gre_packets[d] += packets
            self.stats.gre_bytes[d] += nbytes
