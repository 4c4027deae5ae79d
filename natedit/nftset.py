"""Set elements through nf_tables netlink directly: one batch per transaction, no cache.

libnftables (:mod:`natedit.nftlib`) reads the ruleset into its cache on every run:
about 290 us per transaction on a gateway with iptables-nft tables, most of a call
set-up's share of the worker's time. :class:`SetElements` sends the add and delete
element messages of the ownership sets (:mod:`natedit.owned`) as one nfnetlink batch
(NFNL_MSG_BATCH_BEGIN ... END: one transaction, all or nothing) and reads the
acknowledgements: no cache, no process.

A key is the concatenation's bytes as the kernel compares them: each field in network
order, padded with zeros to 4 bytes (an IPv4 address is 4 bytes; a 16-bit Call ID
read with ``@th,48,16`` is 2 bytes and 2 of padding).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence

from . import NateditError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_DATA_VALUE = 1

_HEADER = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


class SetError(NateditError):
    """The kernel refused a batch of set elements (nothing of it applied)."""


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length & 3)


def key(*fields: bytes) -> bytes:
    """The key of a concatenation: each field padded with zeros to 4 bytes."""
    return b"".join(f + b"\0" * (-len(f) & 3) for f in fields)


class SetElements:
    """One nfnetlink socket; :meth:`apply` is one transaction."""

    def __init__(self, table: str, family: int = socket.AF_INET) -> None:
        self.table = table.encode() + b"\0"
        self.family = family
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.seq = int.from_bytes(os.urandom(2), "big")

    def _message(self, mtype: int, flags: int, family: int, res_id: int,
                 body: bytes = b"") -> tuple[int, bytes]:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
        return self.seq, _HEADER.pack(16 + len(payload), mtype, flags, self.seq, 0) + payload

    def apply(self, changes: Sequence[tuple[bool, str, Iterable[bytes] | None]]) -> None:
        """``changes``: (add, set name, keys) in order, keys None: flush the set (with
        add False); one transaction. Raises SetError when the kernel refuses it (then
        none of it applied)."""
        messages = []
        _, begin = self._message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, socket.AF_UNSPEC,
                                 NFNL_SUBSYS_NFTABLES)
        messages.append(begin)
        acks = []
        for add, name, keys in changes:
            body = (_attr(NFTA_SET_ELEM_LIST_TABLE, self.table)
                    + _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))
            if keys is not None:  # (no element list: the kernel flushes the set)
                elements = b"".join(
                    _attr(NFTA_LIST_ELEM | NLA_F_NESTED, _attr(
                        NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, k)))
                    for k in keys)
                if not elements:
                    continue
                body += _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elements)
            mtype = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if add
                                                   else NFT_MSG_DELSETELEM)
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if add else 0)
            seq, message = self._message(mtype, flags, self.family, 0, body)
            messages.append(message)
            acks.append(seq)
        if not acks:
            return
        _, end = self._message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, socket.AF_UNSPEC,
                               NFNL_SUBSYS_NFTABLES)
        messages.append(end)
        self.sock.sendmsg(messages)
        self._read_acks(set(acks))

    def _read_acks(self, waiting: set[int]) -> None:
        failure: int | None = None
        while waiting:
            data = self.sock.recv(65536)
            at = 0
            while at + 16 <= len(data):
                length, mtype, _flags, seq, _pid = _HEADER.unpack_from(data, at)
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, at + 16)
                    if seq in waiting:  # (not an answer left from an earlier batch)
                        waiting.discard(seq)
                        if code != 0 and failure is None:
                            failure = -code
                at += (length + 3) & ~3
                if length < 16:
                    break
            if failure is not None:
                break
        if failure is not None:
            raise SetError(f"nf_tables refused the set elements: {os.strerror(failure)} "
                           f"({errno.errorcode.get(failure, failure)})")

    def close(self) -> None:
        self.sock.close()
