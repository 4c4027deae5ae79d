"""Spoofed GRE: never delivered to a host that does not own the call, always counted.

Inbound GRE is matched on (public address, server address, public Call ID):
from any other source, or to a Call ID no live call owns, it is dropped as
``no_call``. Outbound GRE is matched on (client address, server, server's Call
ID): one client cannot send into another's call through the gateway. Public
Call IDs are drawn at random (``allocation: random``, a SystemRandom in the
worker), so seeing one's own call's ID says nothing about the others' (the
odds of a blind guess are in the README, "Security and failure model").
"""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import IPv4Address
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from natedit import Action, Allocation
from natedit.core.translator import Translator
from tests.pptp_flows import (
    IN,
    OUT,
    PUBLIC,
    SERVER,
    Conversation,
    establish,
    gre_in,
    gre_out,
    make_translator,
)
from tests.unit.test_fuzz_quick import SCALE

CLIENTS = [f"10.0.0.{10 + i}" for i in range(8)]


def live(n_calls_each: int = 2, **policy: object) -> tuple[Translator, dict[int, tuple[str, int]]]:
    """Clients with established calls; public Call ID -> (client, client Call ID)."""
    tr = make_translator(**policy)
    owners: dict[int, tuple[str, int]] = {}
    for i, client in enumerate(CLIENTS):
        for j in range(n_calls_each):
            conv = Conversation(tr, client, client_port=40000 + j)
            conv.open()
            cid = 0x1234 + j
            owners[establish(conv, cid, 0x80 * (i * n_calls_each + j + 1))] = (client, cid)
    return tr, owners


def test_every_guess_reaches_only_the_call_that_owns_it() -> None:
    """The server's address, every one of the 65,536 Call IDs: exactly the live calls'
    GRE is delivered, each to its own client and Call ID; the rest is dropped, counted."""
    tr, owners = live()
    delivered = {}
    for cid in range(0x10000):
        v = tr.handle_packet(gre_in(cid), IN, 1.0)
        if v.action is Action.ACCEPT:
            assert v.data is not None
            delivered[cid] = (str(IPv4Address(v.data[16:20])), int.from_bytes(v.data[26:28]))
        else:
            assert v.reason == "no_call"
    assert delivered == owners
    assert tr.stats.verdicts[("drop", "no_call")] == 0x10000 - len(owners)


@settings(max_examples=200 * SCALE, deadline=None)
@given(src=st.integers(0, 2**32 - 1), cid=st.integers(0, 0xFFFF), pick_live=st.booleans())
def test_gre_from_any_other_address_is_never_delivered(src: int, cid: int,
                                                       pick_live: bool) -> None:
    tr, owners = live(1)
    source = str(IPv4Address(src))
    if source == SERVER:
        return
    if pick_live:
        cid = sorted(owners)[cid % len(owners)]
    v = tr.handle_packet(gre_in(cid, server=source), IN, 1.0)
    assert (v.action, v.reason) == (Action.DROP, "no_call")


def test_a_client_cannot_send_into_another_clients_call() -> None:
    tr, _owners = live(1)
    # client 10.0.0.11 sends with 10.0.0.10's server Call ID (0x80): no call of its own
    v = tr.handle_packet(gre_out("10.0.0.11", 0x80), OUT, 1.0)
    assert (v.action, v.reason) == (Action.DROP, "no_call")
    v = tr.handle_packet(gre_out("10.0.0.10", 0x80), OUT, 1.0)
    assert v.accepted and v.data is not None and v.data[12:16] == IPv4Address(PUBLIC).packed


def test_random_allocation_says_nothing_about_the_next_id() -> None:
    """Sequential allocation gives the next client ID + 1; random does not: across
    2,000 allocations the gaps between consecutive IDs take hundreds of values and the
    IDs cover the whole range."""
    gaps: dict[Allocation, Counter[int]] = {}
    for allocation in Allocation:
        tr = make_translator(allocation=allocation, max_calls_per_client=65535,
                             max_control_connections=65535)
        tr.rng = random.Random(99)
        tr.table.rng = tr.rng
        ids = []
        for i in range(2000):
            conv = Conversation(tr, "10.0.0.5", client_port=1024 + i)
            conv.open()
            ids.append(establish(conv, 0x1234, i))
        gaps[allocation] = Counter((b - a) % 0x10000 for a, b in pairwise(ids))
        if allocation is Allocation.RANDOM:
            assert min(ids) < 0x0800 and max(ids) > 0xF800
    assert gaps[Allocation.SEQUENTIAL] == Counter({1: 1999})
    assert len(gaps[Allocation.RANDOM]) > 1900 and max(gaps[Allocation.RANDOM].values()) <= 3
