"""natedit.owned: the ownership sets follow the call table, one transaction per flush, a
new call's keys in the kernel before its packet's verdict, repair after a failure."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from natedit import nfqueue, worker
from natedit.core.translator import Translator
from natedit.core.wire import MessageType
from natedit.nftlib import NftError
from natedit.owned import Ownership, OwnershipCollector, _Mirror, key_text
from natedit.owned import server as server_of
from tests.harness.queued import FakePacket
from tests.pptp_flows import IN, OUT, PUBLIC, SERVER, Conversation, establish, make_translator, msg

CLIENT = "10.0.0.11"


def established(tr: Translator, own: Ownership,
                pairs: list[tuple[str, str]]) -> list[Conversation]:
    """One established call per (client, server) (client Call ID 0x1234, server Call ID
    0x80), every event noted by ``own``; their control connections."""
    convs = []
    for client, server in pairs:
        conv = Conversation(tr, client, server=server)
        conv.open()
        own.note(conv.send(OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=0x1234)).events)
        [public] = [k[2] for k, c in tr.table.by_public.items()
                    if c.client_ip == IPv4Address(client).packed]
        reply = msg(MessageType.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=public)
        own.note(conv.send(IN, reply).events)
        convs.append(conv)
    return convs


class FakeNft:
    """Records every transaction; ``fail`` makes the next ones raise."""

    def __init__(self) -> None:
        self.transactions: list[str] = []
        self.fail = 0

    def run(self, commands: str, *, json_output: bool = False, handles: bool = False) -> str:
        if self.fail:
            self.fail -= 1
            raise NftError("nft: Error: Could not process rule: No such file or directory")
        self.transactions.append(commands)
        return ""

    def close(self) -> None:
        pass


def test_keys_follow_the_call_table_one_transaction_per_flush() -> None:
    tr = make_translator()
    nft = FakeNft()
    own = Ownership(tr, nft=nft)
    assert own.start().inbound == ()
    conv = Conversation(tr, CLIENT)
    conv.open()
    own.note(conv.send(OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=0x1234)).events)
    own.flush()
    ((public_key,),) = [list(tr.table.by_public)]
    assert nft.transactions == [f"add element ip natedit own_in {{ {key_text(public_key)} }}\n"
                                f"add element ip natedit own_peer {{ {SERVER} . {PUBLIC} }}\n"]
    assert key_text(public_key).startswith(f"{PUBLIC} . {SERVER} . ")
    reply = msg(MessageType.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=public_key[2])
    own.note(conv.send(IN, reply).events)
    own.flush()
    assert nft.transactions[1] == (
        f"add element ip natedit own_out {{ {CLIENT} . {SERVER} . 128 }}\n"
        f"add element ip natedit own_server {{ {SERVER} . 128 }}\n")
    assert own.owned == {"own_in": 1, "own_out": 1, "own_server": 1, "own_peer": 1}
    own.flush()  # nothing noted: nothing sent
    assert len(nft.transactions) == 2


def test_start_reads_every_call_of_a_restored_table() -> None:
    tr = make_translator()
    conv = Conversation(tr, CLIENT)
    conv.open()
    public = establish(conv, 0x1234, 0x80)
    owned = Ownership(tr, nft=FakeNft()).start()
    assert owned.inbound == (f"{PUBLIC} . {SERVER} . {public}",)
    assert owned.outbound == (f"{CLIENT} . {SERVER} . 128",)
    assert owned.servers == (f"{SERVER} . 128",)
    assert owned.peers == (f"{SERVER} . {PUBLIC}",)


def test_a_failed_update_is_reported_and_the_sets_are_rebuilt() -> None:
    tr = make_translator()
    nft = FakeNft()
    reports: list[str] = []
    own = Ownership(tr, nft=nft, report=reports.append)
    own.start()
    conv = Conversation(tr, CLIENT)
    conv.open()
    nft.fail = 2  # the update and the first rebuild fail
    own.note(conv.send(OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=1)).events)
    own.flush()
    assert len(reports) == 2 and "rebuilding" in reports[0] and "trying again" in reports[1]
    assert own.pending and nft.transactions == []
    own.flush()  # the next turn rebuilds from the whole table
    ((key,),) = [list(tr.table.by_public)]
    assert nft.transactions == [
        "flush set ip natedit own_in\nflush set ip natedit own_peer\n"
        f"add element ip natedit own_in {{ {key_text(key)} }}\n"
        f"add element ip natedit own_peer {{ {SERVER} . {PUBLIC} }}\n"
        "flush set ip natedit own_out\nflush set ip natedit own_server\n"]
    assert not own.pending and own.owned["own_in"] == 1


@dataclass
class Recorded:
    """A worker whose ownership set updates and verdict writes are recorded in order."""

    tr: Translator
    nft: FakeNft
    dispatcher: worker.Dispatcher
    batch: nfqueue.Verdicts
    order: list[str]


def recorded() -> Recorded:
    tr = make_translator()
    nft = FakeNft()
    dispatcher = worker.Dispatcher(tr)
    dispatcher.ownership = Ownership(tr, nft=nft)
    dispatcher.ownership.start()
    order: list[str] = []
    nft_run = nft.run

    def run(commands: str, **kw: bool) -> str:
        order.append("nft")
        return nft_run(commands, **kw)

    class Sock:
        def sendmsg(self, parts: list[bytes]) -> int:
            order.append("verdicts")
            return sum(map(len, parts))

    nft.run = run  # type: ignore[method-assign]
    batch = nfqueue.Verdicts(1723)
    batch.sock = Sock()
    batch.before_send = dispatcher.settle_pending
    return Recorded(tr, nft, dispatcher, batch, order)


def test_the_worker_claims_a_new_call_before_the_verdict_of_its_packet() -> None:
    """A quiet queue sends each verdict as it is given (nfqueue.Verdicts.limit 0): the
    sets learn the new call first, in the same step."""
    r = recorded()
    r.batch.limit = 0  # quiet
    conv = Conversation(r.tr, CLIENT)
    conv.open()
    request = conv.segment(OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=0x1234))
    r.dispatcher.packets.packet(FakePacket(request), OUT, r.batch)
    assert r.order == ["nft", "verdicts"]
    r.dispatcher.flush()
    assert r.order == ["nft", "verdicts"]


def test_with_batched_verdicts_the_sets_learn_the_batch_once_before_it_is_sent() -> None:
    """The worker's verdicts go to the kernel once per queue and turn (nfqueue.Verdicts):
    the new calls of the whole batch go into the sets in one transaction, just before."""
    r = recorded()
    tr, nft, dispatcher, batch, order = r.tr, r.nft, r.dispatcher, r.batch, r.order

    class Queued(FakePacket):
        id = 1

    for client in (CLIENT, "10.0.0.12"):
        conv = Conversation(tr, client)
        conv.open()
        request = conv.segment(OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=0x1234))
        dispatcher.packets.packet(Queued(request), OUT, batch)
    assert order == []  # nothing sent yet, nothing claimed yet
    batch.send()
    assert order == ["nft", "verdicts"]
    assert nft.transactions[0].count("198.51.100.2 . ") == 3  # both calls (+ own_peer), once
    dispatcher.flush()
    assert order == ["nft", "verdicts"]


def test_a_released_call_leaves_the_sets() -> None:
    tr = make_translator()
    nft = FakeNft()
    own = Ownership(tr, nft=nft)
    own.start()
    conv = Conversation(tr, CLIENT)
    conv.open()
    own.note(conv.send(OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=0x1234)).events)
    ((public_key,),) = [list(tr.table.by_public)]
    reply = msg(MessageType.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=public_key[2])
    own.note(conv.send(IN, reply).events)
    own.flush()
    assert own.owned == {"own_in": 1, "own_out": 1, "own_server": 1, "own_peer": 1}
    clear = msg(MessageType.CALL_DISCONNECT_NOTIFY, call_id=0x80)
    own.note(conv.send(IN, clear).events)
    own.flush()
    assert not tr.table.by_public and not tr.table.by_server
    assert nft.transactions[-1] == (
        f"delete element ip natedit own_in {{ {key_text(public_key)} }}\n"
        f"delete element ip natedit own_peer {{ {SERVER} . {PUBLIC} }}\n"
        f"delete element ip natedit own_out {{ {CLIENT} . {SERVER} . 128 }}\n"
        f"delete element ip natedit own_server {{ {SERVER} . 128 }}\n")
    assert own.owned == {"own_in": 0, "own_out": 0, "own_server": 0, "own_peer": 0}


def test_own_server_goes_with_the_last_call_that_names_it() -> None:
    """Two clients' calls with one server Call ID share an own_server element: it stays
    until both are gone."""
    tr = make_translator()
    nft = FakeNft()
    own = Ownership(tr, nft=nft)
    own.start()
    convs = established(tr, own, [(CLIENT, SERVER), ("10.0.0.12", SERVER)])
    own.flush()
    assert (own.owned["own_out"], own.owned["own_server"], own.owned["own_in"]) == (2, 1, 2)
    own.note(convs[0].send(IN, msg(MessageType.CALL_DISCONNECT_NOTIFY, call_id=0x80)).events)
    own.flush()
    assert (own.owned["own_out"], own.owned["own_server"], own.owned["own_in"]) == (1, 1, 1)
    assert "own_server" not in nft.transactions[-1]
    own.note(convs[1].send(IN, msg(MessageType.CALL_DISCONNECT_NOTIFY, call_id=0x80)).events)
    own.flush()
    assert (own.owned["own_out"], own.owned["own_server"], own.owned["own_in"]) == (0, 0, 0)
    assert f"delete element ip natedit own_server {{ {SERVER} . 128 }}" in nft.transactions[-1]


def test_collector_tells_the_keys() -> None:
    own = Ownership(make_translator(), nft=FakeNft())
    families = {f.name: f for f in OwnershipCollector(own).collect()}
    keys = {s.labels["set"]: s.value for s in families["natedit_owned_keys"].samples}
    assert keys == {"own_in": 0, "own_out": 0, "own_server": 0, "own_peer": 0}
    assert {f.name for f in OwnershipCollector(None).collect()} == {"natedit_owned_keys"}


def test_own_peer_follows_own_in_and_goes_with_the_last_call_to_its_server() -> None:
    """own_peer (server . public address) is own_in's keys without the Call ID: two calls
    to one server from one public address share an element, which goes with the last;
    a call to another server has its own."""
    tr = make_translator()
    nft = FakeNft()
    own = Ownership(tr, nft=nft)
    own.start()
    other = "198.51.100.3"
    convs = established(tr, own, [(CLIENT, SERVER), ("10.0.0.12", SERVER), ("10.0.0.13", other)])
    own.flush()
    assert (own.owned["own_in"], own.owned["own_peer"]) == (3, 2)
    assert nft.transactions[-1].count("own_peer") == 1
    assert f"{SERVER} . {PUBLIC}, {other} . {PUBLIC}" in nft.transactions[-1]
    own.note(convs[0].send(IN, msg(MessageType.CALL_DISCONNECT_NOTIFY, call_id=0x80)).events)
    own.flush()
    assert (own.owned["own_in"], own.owned["own_peer"]) == (2, 2)
    assert "own_peer" not in nft.transactions[-1]
    for conv in convs[1:]:
        own.note(conv.send(IN, msg(MessageType.CALL_DISCONNECT_NOTIFY, call_id=0x80)).events)
    own.flush()
    assert (own.owned["own_in"], own.owned["own_peer"]) == (0, 0)
    assert nft.transactions[-1].count("delete element ip natedit own_peer") == 1
    assert f"{SERVER} . {PUBLIC}, {other} . {PUBLIC}" in nft.transactions[-1]


def test_a_mirror_s_changes_keep_both_sets_equal_to_the_table_whatever_the_order() -> None:
    """_Mirror.changes works on the dirty keys only (not the whole table, which made
    call set-ups slower as the table grew): after any sequence of calls coming and
    going, flushed in batches, the exact set and the projected set (with its counts)
    are what the table says."""
    rng = random.Random(16)
    mirror = _Mirror("own_out", "own_server")
    now: dict[tuple[bytes, bytes, int], object] = {}
    exact: set[tuple[bytes, bytes, int]] = set()
    projected: set[tuple[bytes, int]] = set()
    clients = [bytes([10, 0, 0, i]) for i in range(1, 5)]
    servers = [bytes([198, 51, 100, i]) for i in range(2, 4)]
    for _ in range(400):
        for _ in range(rng.randrange(1, 6)):
            k = (rng.choice(clients), rng.choice(servers), rng.randrange(3))
            if k in now and rng.random() < 0.6:
                del now[k]
            else:
                now[k] = object()
            mirror.dirty.add(k)
        ops, commit = mirror.changes(now)
        for verb, name, keys in ops:
            target: set[Any] = exact if name == "own_out" else projected
            for key in keys:
                assert (key not in target) if verb == "add" else (key in target)
                (target.add if verb == "add" else target.discard)(key)
        commit()
        assert exact == set(now) == mirror.keys
        assert projected == {server_of(k) for k in now} == set(mirror.counts)
        assert mirror.counts == Counter(server_of(k) for k in now)
