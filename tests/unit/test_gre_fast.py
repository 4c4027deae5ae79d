"""The GRE shortcuts of the user-space datapath (``Translator.gre_in_fast`` and
``gre_out_fast``, tried by the worker before ``handle_packet``) against
``handle_packet`` itself.

Two translators with the same calls see the same packets; one asks the shortcut
first and ``handle_packet`` only when it declines, the other always asks
``handle_packet``. The bytes that leave, the counters (totals and per call) and the
calls' timers must be the same, whatever the packet: the shortcut may decline
anything, but never decide differently.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from natedit import Action, Direction
from natedit.core.translator import Translator
from natedit.core.wire import build_gre
from tests.pptp_flows import IN, OUT, PUBLIC, SERVER, Conversation, establish, make_translator

CLIENTS = ("10.0.0.11", "10.0.0.12")


def pair() -> tuple[Translator, Translator, list[int]]:
    """Two translators with the same two established calls (and one only requested)."""
    out = []
    publics: list[int] = []
    for _ in range(2):
        tr = make_translator()
        publics = []
        for i, client in enumerate(CLIENTS):
            conv = Conversation(tr, client, client_port=40000 + i)
            conv.open()
            publics.append(establish(conv, 0x1234, 128 * i))
        out.append(tr)
    return out[0], out[1], publics


def via_shortcut(tr: Translator, data: bytes, d: Direction, now: float) -> bytes | None:
    """What the worker sends for ``data``: new bytes, the same bytes, or None (drop)."""
    fast = tr.gre_out_fast if d is OUT else tr.gre_in_fast
    try:
        out = fast(data, now)
    except IndexError:
        out = None
    if out is not None:
        return out
    return via_core(tr, data, d, now)


def via_core(tr: Translator, data: bytes, d: Direction, now: float) -> bytes | None:
    v = tr.handle_packet(data, d, now)
    if v.action is Action.DROP:
        return None
    return data if v.data is None else v.data


def same_state(a: Translator, b: Translator) -> None:
    assert a.stats.gre_packets == b.stats.gre_packets
    assert a.stats.gre_bytes == b.stats.gre_bytes
    assert a.stats.verdicts == b.stats.verdicts
    for ca, cb in zip(a.table.calls(), b.table.calls(), strict=True):
        assert (ca.gre_packets, ca.gre_bytes, ca.last_seen) == (
            cb.gre_packets, cb.gre_bytes, cb.last_seen)


def mutate(packet: bytes, edits: list[tuple[int, int]], cut: int, extra: bytes) -> bytes:
    buf = bytearray(packet)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:max(0, len(buf) - cut)]) + extra


GRE_HEADS = st.sampled_from([(0x30, 0x01), (0x20, 0x01), (0x30, 0x81), (0x20, 0x81),
                             (0x31, 0x01), (0x30, 0x00), (0x70, 0x01), (0x30, 0x09)])


@settings(max_examples=400, deadline=None)
@given(st.booleans(), st.integers(0, 3), GRE_HEADS, st.integers(0, 1400),
       st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=3),
       st.integers(0, 30), st.binary(max_size=4), st.booleans())
def test_shortcut_decides_as_handle_packet(inbound: bool, which: int,
                                           head: tuple[int, int], size: int,
                                           edits: list[tuple[int, int]], cut: int,
                                           extra: bytes, keep: bool) -> None:
    a, b, publics = pair()
    if inbound:
        call_id = publics[which] if which < 2 else 0x9999
        packet = build_gre(SERVER, PUBLIC, call_id, bytes(size))
        d = IN
    else:
        packet = build_gre(CLIENTS[which % 2], SERVER, (0, 128, 256, 0)[which], bytes(size))
        d = OUT
    packet = packet[:20] + bytes(head) + packet[22:]
    if not keep:
        packet = mutate(packet, edits, cut, extra)
    for now in (5.0, 6.0):  # twice: counters add up the same way
        assert via_shortcut(a, packet, d, now) == via_core(b, packet, d, now)
        same_state(a, b)


def test_shortcut_takes_the_usual_packets() -> None:
    """It does not just decline everything: both directions, both sizes, with and
    without sequence and acknowledgement numbers."""
    a, _, publics = pair()
    for seq, ack in ((1, None), (1, 2), (None, 2)):
        for size in (0, 64, 1400):
            inbound = build_gre(SERVER, PUBLIC, publics[1], bytes(size), seq=seq, ack=ack)
            out = a.gre_in_fast(inbound, 1.0)
            assert out is not None and out[16:20] == bytes([10, 0, 0, 12])
            assert struct.unpack_from("!H", out, 26)[0] == 0x1234
            outbound = build_gre(CLIENTS[0], SERVER, 0, bytes(size), seq=seq, ack=ack)
            out = a.gre_out_fast(outbound, 1.0)
            assert out is not None and out[12:16] == bytes([198, 51, 100, 1])
