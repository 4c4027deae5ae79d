"""Which public address a control connection was NATed to: read from conntrack.

Theory of operation
-------------------
natedit's queues see TCP 1723 before the kernel's SNAT (outbound, mangle
FORWARD) and after its un-NAT (inbound, :mod:`natedit.rules`): the segments
never show the address a connection leaves with. With several public
addresses (several uplinks, an SNAT pool, per-network SNAT) each call must get
its connection's, so the worker asks conntrack: the reply tuple of the
connection's entry (looked up by its original tuple, client -> server:1723) is
addressed to it. The SYN's SNAT binding is made at POSTROUTING, so by the first
message (Start-Control-Connection-Request, long before an Outgoing-Call-Request)
the entry is confirmed and holds it.

:class:`NatAddresses` is the edge's side of ``Translator.handle_packet(...,
public)``: for a TCP 1723 segment that carries data it gives the connection's
address, asking conntrack once per connection and again when the answer is
older than :data:`RECHECK` (control traffic is a few segments a minute, so a
connection whose NAT address changes, an uplink failover, is seen at its next
segment: the core then ends its calls). No answer (no entry, conntrack not
readable): None, the core keeps what the connection had. A connection that is
not NATed answers its own client address, which is none of the public ones: its
calls are refused (``refused:not_public``), never mapped to a wrong address.

:class:`Ctnetlink` is the lookup through pyroute2's ctnetlink binding
(``NFCTSocket``, ``IPCTNL_MSG_CT_GET`` by original tuple): a maintained binding
rather than netlink written by hand here. Anything else with its call signature
(a test's dictionary) does as well.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from . import PPTP_PORT, Direction, NateditError

log = logging.getLogger("natedit")

RECHECK = 1.0
"""Seconds a connection's NAT address, once read, is taken as known."""
CACHE = 65536
"""Most connections remembered (then the memory starts afresh: each asks again)."""

Lookup = Callable[[bytes, int, bytes, int], "bytes | None"]
"""(client, client port, server, server port) -> the address (packed) the reply
direction of that TCP connection's conntrack entry goes to; None: no entry."""

_PORTS = struct.Struct("!HH")


class NatAddresses:
    """The edge's NAT address for each TCP 1723 segment (see the module docstring).

    ``counts`` gets ``conntrack_error`` when a lookup raises (the segment then gets
    None, and the next one of the connection asks again).
    """

    def __init__(self, lookup: Lookup, counts: Counter[str] | None = None) -> None:
        self.lookup = lookup
        self.counts = counts if counts is not None else Counter()
        self._known: dict[tuple[bytes, int, bytes, int], tuple[bytes, float]] = {}
        self.lookups = 0
        """Lookups made (for tests and the log line at stop)."""

    def __call__(self, data: bytes, direction: Direction, now: float) -> bytes | None:
        key = connection_key(data, direction)
        if key is None:
            return None
        known = self._known.get(key)
        if known is not None and now - known[1] < RECHECK:
            return known[0]
        self.lookups += 1
        try:
            public = self.lookup(*key)
        except Exception as exc:  # a lookup that fails never fails the packet
            self.counts["conntrack_error"] += 1
            log.debug("conntrack lookup failed: %s", exc)
            return None
        if public is None:
            self._known.pop(key, None)
            return None
        if len(self._known) >= CACHE:
            self._known.clear()
        self._known[key] = (public, now)
        return public


def connection_key(data: bytes, direction: Direction) -> tuple[bytes, int, bytes, int] | None:
    """(client, client port, server, server port) of a TCP 1723 segment that carries
    data (no SYN: its connection is not in conntrack's table before it leaves), or
    None for anything else."""
    if len(data) < 40 or data[9] != 6 or data[6] & 0x1F or data[7]:
        return None
    ihl = (data[0] & 0x0F) * 4
    if len(data) < ihl + 20:
        return None
    total = data[2] << 8 | data[3]
    if total <= ihl + (data[ihl + 12] >> 4) * 4:
        return None
    sport, dport = _PORTS.unpack_from(data, ihl)
    if direction is Direction.OUTBOUND:
        if dport != PPTP_PORT:
            return None
        return data[12:16], sport, data[16:20], dport
    if sport != PPTP_PORT:
        return None
    return data[16:20], dport, data[12:16], sport


class ConntrackError(NateditError):
    """conntrack cannot be read (no pyroute2, no ctnetlink, no permission)."""


class Ctnetlink:
    """:data:`Lookup` through ctnetlink (pyroute2's ``NFCTSocket``), in the current
    network namespace. Raises :class:`ConntrackError` when it cannot open."""

    def __init__(self) -> None:
        try:
            from pyroute2 import NFCTSocket
            from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
        except ImportError as exc:
            raise ConntrackError(f"pyroute2 is needed to read conntrack: {exc}") from exc
        try:
            self._sock: Any = NFCTSocket()
        except OSError as exc:
            raise ConntrackError(f"cannot open ctnetlink: {exc}") from exc
        self._tuple = NFCTAttrTuple
        from pyroute2.netlink.exceptions import NetlinkError
        self._error: type[Exception] = NetlinkError

    def __call__(self, client: bytes, client_port: int, server: bytes,
                 server_port: int) -> bytes | None:
        orig = self._tuple(saddr=str(IPv4Address(client)), daddr=str(IPv4Address(server)),
                           proto=6, sport=client_port, dport=server_port)
        try:
            answer = self._sock.entry("get", tuple_orig=orig)
        except self._error as exc:
            if getattr(exc, "code", None) == errno.ENOENT:
                return None
            raise
        return reply_destination(answer)

    def close(self) -> None:
        self._sock.close()


def reply_destination(messages: Any) -> bytes | None:
    """The reply tuple's destination in pyroute2's answer to a get (packed), or None."""
    for message in messages or ():
        reply = message.get_attr("CTA_TUPLE_REPLY")
        if reply is None:
            continue
        ip = reply.get_attr("CTA_TUPLE_IP")
        dst = None if ip is None else ip.get_attr("CTA_IP_V4_DST")
        if dst:
            return IPv4Address(dst).packed
    return None
