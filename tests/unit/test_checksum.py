"""RFC 1071 checksums and the RFC 1624 incremental update, against full recomputes.

The incremental form ``HC' = ~(~HC + ~m + m')`` is exact as long as the data
is not all zero (then one's-complement arithmetic cannot produce -0), which
every IP header and TCP pseudo-header satisfies (version nibble, protocol 6);
the generic property pins one non-zero word for the same reason.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from natedit.core.checksum import address_delta, apply_delta, internet_checksum, word_delta
from natedit.core.control import _apply
from natedit.core.wire import build_ipv4, tcp_checksum
from tests.pptp_flows import ip_checksum_ok, tcp_checksum_ok

addresses = st.integers(0, 2**32 - 1).map(lambda n: ipaddress.IPv4Address(n).packed)


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (after the carry).
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2 & 0xFFFF)


def test_odd_length_is_zero_padded() -> None:
    assert internet_checksum(b"\x12\x34\x56") == internet_checksum(b"\x12\x34\x56\x00")
    assert internet_checksum(b"") == 0xFFFF


def test_rfc1624_example_gives_zero_not_minus_zero() -> None:
    # RFC 1624 section 4: HC 0xDD2F, m 0x5555 -> m' 0x3285 gives 0x0000 (eqn. 3);
    # the older RFC 1141 form would give 0xFFFF.
    assert apply_delta(0xDD2F, word_delta(0x5555, 0x3285)) == 0x0000


def test_ip_header_example() -> None:
    # A textbook header: 4500 0073 0000 4000 4011 [b861] c0a8 0001 c0a8 00c7.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(hdr) == 0xB861
    new = hdr[:12] + bytes([10, 0, 0, 5]) + hdr[16:]
    assert apply_delta(0xB861, address_delta(hdr[12:16], new[12:16])) == internet_checksum(new)


@given(
    words=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40),
    changes=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 0xFFFF)), max_size=8),
)
def test_word_updates_equal_recompute(words: list[int], changes: list[tuple[int, int]]) -> None:
    data = [0x4500, *words]  # one non-zero word: see the module docstring
    csum = internet_checksum(struct.pack(f"!{len(data)}H", *data))
    delta = 0
    for index, new in changes:
        i = 1 + index % len(words)
        delta += word_delta(data[i], new)
        data[i] = new
    assert apply_delta(csum, delta) == internet_checksum(struct.pack(f"!{len(data)}H", *data))


@given(src=addresses, dst=addresses, new=addresses, which=st.sampled_from([12, 16]),
       options=st.integers(0, 10).map(lambda n: b"\x01" * (4 * n)),
       proto=st.integers(0, 255), ident=st.integers(0, 0xFFFF), ttl=st.integers(0, 255))
def test_address_delta_equals_recompute(src: bytes, dst: bytes, new: bytes, which: int,
                                        options: bytes, proto: int, ident: int,
                                        ttl: int) -> None:
    pkt = build_ipv4(str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)), proto,
                     b"payload", options=options, ident=ident, ttl=ttl)
    ihl = len(options) + 20
    buf = bytearray(pkt)
    old = bytes(buf[which : which + 4])
    buf[which : which + 4] = new
    csum = struct.unpack_from("!H", buf, 10)[0]
    struct.pack_into("!H", buf, 10, apply_delta(csum, address_delta(old, new)))
    assert ip_checksum_ok(bytes(buf))
    zeroed = buf[:10] + b"\x00\x00" + buf[12:ihl]
    assert struct.unpack_from("!H", buf, 10)[0] == internet_checksum(zeroed)


def tcp_packet(src: bytes, dst: bytes, tcp_options: bytes, ip_options: bytes, payload: bytes,
               sport: int, seq: int) -> tuple[bytes, int]:
    """An IPv4/TCP packet with options on both layers; (packet, payload offset)."""
    doff = 20 + len(tcp_options)
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, 1723, seq, 0, (doff // 4) << 4, 0x18,
                                65535, 0, 0) + tcp_options + payload)
    struct.pack_into("!H", seg, 16, tcp_checksum(src, dst, seg))
    pkt = build_ipv4(str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)), 6,
                     bytes(seg), options=ip_options)
    return pkt, 20 + len(ip_options) + doff


@given(
    src=addresses, dst=addresses,
    tcp_opts=st.integers(0, 10).map(lambda n: b"\x01" * (4 * n)),
    ip_opts=st.integers(0, 10).map(lambda n: b"\x01" * (4 * n)),
    payload=st.binary(min_size=1, max_size=300),
    sport=st.integers(0, 0xFFFF), seq=st.integers(0, 2**32 - 1),
    writes=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=10),
)
def test_translator_tcp_patch_equals_recompute(src: bytes, dst: bytes, tcp_opts: bytes,
                                               ip_opts: bytes, payload: bytes, sport: int,
                                               seq: int, writes: list[tuple[int, int]]) -> None:
    """``_apply`` (single bytes at odd and even offsets, repeats) keeps TCP checksum exact."""
    pkt, start = tcp_packet(src, dst, tcp_opts, ip_opts, payload, sport, seq)
    assert tcp_checksum_ok(pkt)
    placed = [(pos % len(payload), value) for pos, value in writes]
    out = _apply(pkt, start, placed)
    expected = bytearray(payload)
    for pos, value in placed:
        expected[pos] = value
    assert out[start:] == bytes(expected)
    assert out[: start - (len(tcp_opts) + 20) + 16] == pkt[: start - (len(tcp_opts) + 20) + 16]
    assert tcp_checksum_ok(out) and ip_checksum_ok(out)
    ihl = 20 + len(ip_opts)
    seg = bytearray(out[ihl:])
    got = struct.unpack_from("!H", seg, 16)[0]
    seg[16:18] = b"\x00\x00"
    assert got == tcp_checksum(src, dst, seg)
