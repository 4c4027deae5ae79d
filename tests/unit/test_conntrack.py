"""natedit.conntrack: the edge that gives each control connection its NAT address
(a dictionary stands in for ctnetlink here; tests/netns/test_public_addresses.py reads
the real conntrack of a gateway doing SNAT)."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import IPv4Address
from typing import Any

from natedit import Direction, Policy, Translator
from natedit.conntrack import RECHECK, NatAddresses, connection_key, reply_destination
from natedit.core.errors import ReleaseReason
from natedit.core.events import CallReleased
from natedit.core.wire import TCP_SYN, MessageType, build_control_message, build_gre, build_tcp
from natedit.nfqueue import PacketPath
from tests.harness.queued import give

OUT, IN = Direction.OUTBOUND, Direction.INBOUND
CLIENT, SERVER = "10.0.0.5", "203.0.113.2"
A, B = IPv4Address("198.51.100.1"), IPv4Address("198.51.100.3")
KEY = (IPv4Address(CLIENT).packed, 40000, IPv4Address(SERVER).packed, 1723)
HELLO = build_control_message(MessageType.START_CONTROL_CONNECTION_REQUEST)


def out_segment(payload: bytes = HELLO, flags: int = 0x10) -> bytes:
    return build_tcp(CLIENT, SERVER, 40000, 1723, 1, payload, flags=flags)


def test_connection_key_of_control_segments_with_data_only() -> None:
    assert connection_key(out_segment(), OUT) == KEY
    assert connection_key(build_tcp(SERVER, CLIENT, 1723, 40000, 1, HELLO), IN) == KEY
    assert connection_key(out_segment(b"", TCP_SYN), OUT) is None  # not in conntrack yet
    assert connection_key(build_tcp(CLIENT, SERVER, 40000, 80, 1, b"x"), OUT) is None
    assert connection_key(build_gre(CLIENT, SERVER, 1, b"xx"), OUT) is None
    assert connection_key(out_segment()[:30], OUT) is None


class FakeConntrack:
    def __init__(self) -> None:
        self.table: dict[tuple[bytes, int, bytes, int], bytes] = {KEY: A.packed}
        self.asked = 0
        self.fail = False

    def __call__(self, client: bytes, cport: int, server: bytes, sport: int) -> bytes | None:
        self.asked += 1
        if self.fail:
            raise OSError("netlink trouble")
        return self.table.get((client, cport, server, sport))


def test_asks_once_per_connection_then_again_after_recheck() -> None:
    ct = FakeConntrack()
    counts: Counter[str] = Counter()
    nat = NatAddresses(ct, counts)
    assert nat(out_segment(), OUT, 0.0) == A.packed
    assert nat(out_segment(), OUT, RECHECK / 2) == A.packed
    assert ct.asked == 1
    ct.table[KEY] = B.packed  # the uplink failed over
    assert nat(out_segment(), OUT, RECHECK + 0.1) == B.packed
    assert ct.asked == 2
    ct.fail = True
    assert nat(out_segment(), OUT, 3 * RECHECK) is None
    assert counts["conntrack_error"] == 1
    del ct.table[KEY]
    ct.fail = False
    assert nat(out_segment(), OUT, 5 * RECHECK) is None


def test_reply_destination_reads_pyroute2_messages() -> None:
    class Nla:
        def __init__(self, **attrs: object) -> None:
            self.attrs = attrs

        def get_attr(self, name: str) -> object:
            return self.attrs.get(name)

    answer = [Nla(CTA_TUPLE_REPLY=Nla(CTA_TUPLE_IP=Nla(CTA_IP_V4_SRC=SERVER,
                                                       CTA_IP_V4_DST="198.51.100.3"))),
              Nla()]  # (the ack)
    assert reply_destination(answer) == B.packed
    assert reply_destination([Nla()]) is None


def test_the_packet_path_gives_the_translator_each_connection_address() -> None:
    """Through nfqueue.PacketPath: the call gets the conntrack address; when conntrack
    says another one, the calls end (public_address_changed)."""
    tr = Translator(Policy(public_address=A, other_public_addresses=(B,)),
                    rng=random.Random(3))
    ct = FakeConntrack()
    ct.table[KEY] = B.packed
    events: list[object] = []
    path = PacketPath(tr, lambda: 0.0, Counter(), events.extend, lambda k, w: None)
    path.read_nat(NatAddresses(ct), tr)

    class Packet:
        id = 1

        def __init__(self, data: bytes) -> None:
            self.data, self.verdict, self.out = data, "", data

        def get_payload(self) -> bytes:
            return self.data

        def set_payload(self, payload: bytes) -> None:
            self.out = payload

        def accept(self) -> None:
            self.verdict = "accept"

        def drop(self) -> None:
            self.verdict = "drop"

    seq = [2]  # (after the SYN, sequence 1)

    def send(payload: bytes, now: float) -> Packet:
        p = Packet(build_tcp(CLIENT, SERVER, 40000, 1723, seq[0], payload))
        give(path, p, OUT, now=now)
        seq[0] += len(payload)
        return p

    give(path, Packet(out_segment(b"", TCP_SYN)), OUT, now=0.0)
    assert send(HELLO, 0.0).verdict == "accept"
    send(build_control_message(MessageType.OUTGOING_CALL_REQUEST, call_id=0x1234), 0.1)
    assert [c.public_address for c in tr.calls()] == [B]
    ct.table[KEY] = A.packed
    send(build_control_message(MessageType.ECHO_REQUEST), 2 * RECHECK)
    assert not tr.calls()
    assert [e.reason for e in events if isinstance(e, CallReleased)] == [
        ReleaseReason.PUBLIC_ADDRESS_CHANGED]


def test_the_worker_needs_conntrack_only_for_several_addresses(monkeypatch: Any,
                                                               caplog: Any) -> None:
    """conntrack unreadable: with one public address a warning (every call gets it),
    with several the worker does not start."""
    import pytest

    from natedit import NateditError, conntrack, worker

    def unreadable() -> None:
        raise conntrack.ConntrackError("cannot open ctnetlink: denied")

    monkeypatch.setattr(conntrack, "Ctnetlink", unreadable)
    one = Policy(public_address=A)
    tr = Translator(one, rng=random.Random(1))
    assert worker._read_nat(one, tr, worker.Dispatcher(tr)) is None
    assert "every call gets 198.51.100.1" in caplog.text
    several = Policy(public_address=A, other_public_addresses=(B,))
    tr = Translator(several, rng=random.Random(1))
    with pytest.raises(NateditError, match="several public addresses need conntrack"):
        worker._read_nat(several, tr, worker.Dispatcher(tr))
