"""Offline replay: run the core over a capture, write what natedit would emit.

The capture holds packets as the gateway's queue would see them: outbound
with the client's private source, inbound TCP 1723 after the kernel undid
its NAT (private destination), inbound GRE to the public address. Direction
is decided from the policy's inside networks: a private source is outbound,
anything else inbound. Packets the core drops are left out of the output;
the summary on stdout counts every verdict.

scapy's raw pcap reader and writer do the file I/O; the core sees bytes.
"""

from __future__ import annotations

import ipaddress
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from scapy.utils import RawPcapReader, RawPcapWriter

from . import IPPROTO_GRE, Direction, NateditError, Policy, Translator
from .policyfile import load_policy
from .view import format_calls

DLT_EN10MB = 1
DLT_RAW = (101, 228)
LINUX_SLL = 113


@dataclass
class ReplaySummary:
    packets: int = 0
    written: int = 0
    rewritten: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    passed: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    """Frames that are not IPv4 and went to the output untouched."""

    def render(self, translator: Translator, out: TextIO) -> None:
        st = translator.stats
        print(f"packets {self.packets}  written {self.written}  rewritten {self.rewritten}  "
              f"dropped {sum(self.dropped.values())}  not-ipv4 {self.skipped}", file=out)
        for reason, n in sorted(self.dropped.items()):
            print(f"  drop    {reason:<24} {n}", file=out)
        for reason, n in sorted(self.passed.items()):
            print(f"  pass    {reason:<24} {n}", file=out)
        print(f"calls mapped {st.calls_mapped}  released {sum(st.calls_released.values())}  "
              f"refused {sum(st.calls_refused.values())}  live {len(translator.table)}", file=out)
        for reason, n in sorted(st.calls_released.items()):
            print(f"  released {reason:<22} {n}", file=out)
        calls = translator.calls()
        if calls:
            print("live calls:", file=out)
            print(format_calls(calls), file=out)


def _ip_offset(linktype: int, frame: bytes) -> int | None:
    """Where the IPv4 packet starts in a frame, or None if it is not IPv4."""
    if linktype == DLT_EN10MB:
        off, etype = 14, frame[12:14]
        while etype == b"\x81\x00" and len(frame) >= off + 4:  # 802.1Q tags
            etype = frame[off + 2 : off + 4]
            off += 4
        return off if etype == b"\x08\x00" else None
    if linktype in DLT_RAW:
        return 0 if frame[:1] and frame[0] >> 4 == 4 else None
    if linktype == LINUX_SLL:
        return 16 if frame[14:16] == b"\x08\x00" else None
    raise NateditError(f"unsupported link type {linktype} (Ethernet, raw IP or Linux SLL)")


def _frames(path: str) -> Iterator[tuple[bytes, tuple[int, int], int]]:
    """(frame, (seconds, microseconds), link type) of every record."""
    reader = RawPcapReader(path)
    try:
        linktype = reader.linktype
        for data, meta in reader:
            yield data, (int(meta.sec), int(meta.usec)), linktype
    finally:
        reader.close()


def guess_public_address(path: str, policy: Policy) -> ipaddress.IPv4Address | None:
    """The destination of the first GRE packet that comes from outside to outside."""
    for frame, _ts, linktype in _frames(path):
        off = _ip_offset(linktype, frame)
        if off is None or len(frame) < off + 20 or frame[off + 9] != IPPROTO_GRE:
            continue
        src = ipaddress.IPv4Address(frame[off + 12 : off + 16])
        dst = ipaddress.IPv4Address(frame[off + 16 : off + 20])
        if not policy.is_inside(src) and not policy.is_inside(dst):
            return dst
    return None


def replay(in_path: str, out_path: str, policy: Policy, out: TextIO = sys.stdout) -> int:
    if policy.public_address is None:
        guessed = guess_public_address(in_path, policy)
        if guessed is None:
            raise NateditError(
                f"{in_path}: cannot tell the public address (no GRE from outside to "
                "outside); give it: --public-address A, or public_address in the policy")
        policy = policy.with_public_address(guessed)
    translator = Translator(policy)
    summary = ReplaySummary()
    writer: RawPcapWriter | None = None
    try:
        for frame, (sec, usec), linktype in _frames(in_path):
            ts = sec + usec / 1e6
            if writer is None:
                writer = RawPcapWriter(out_path, linktype=linktype)
                writer.write_header(None)  # scapy 2.8 writes it late otherwise
            summary.packets += 1
            deadline = translator.next_deadline()
            if deadline is not None and deadline <= ts:
                translator.handle_timer(ts)
            off = _ip_offset(linktype, frame)
            if off is None:
                summary.skipped += 1
                writer.write_packet(frame, sec=sec, usec=usec)
                summary.written += 1
                continue
            packet = frame[off:]
            src = ipaddress.IPv4Address(packet[12:16]) if len(packet) >= 20 else None
            d = (Direction.OUTBOUND if src is not None and policy.is_inside(src)
                 else Direction.INBOUND)
            v = translator.handle_packet(packet, d, ts)
            if not v.accepted:
                summary.dropped[v.reason or "?"] += 1
                continue
            if v.reason:
                summary.passed[v.reason] += 1
            if v.data is not None:
                summary.rewritten += 1
                frame = frame[:off] + v.data
            writer.write_packet(frame, sec=sec, usec=usec)
            summary.written += 1
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # empty capture: still write a valid empty file
        empty = RawPcapWriter(out_path, linktype=DLT_RAW[0])
        empty.write_header(None)
        empty.close()
    summary.render(translator, out)
    return 0


def main(in_path: str, out_path: str, policy_path: str | None,
         public_address: ipaddress.IPv4Address | None = None) -> int:
    """``natedit replay``: ``public_address`` (``--public-address``) overrides the policy's."""
    policy = load_policy(policy_path)
    if public_address is not None:
        policy = policy.with_public_address(public_address)
    return replay(in_path, out_path, policy)
