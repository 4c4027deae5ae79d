"""One client as greedy as it can be: the others keep getting calls, memory stays bounded.

A client opens calls as fast as it can (several per segment, on one control
connection and on many, never waiting for replies), opens control
connections, and makes natedit rewrite as many Call IDs as it likes. The
per-client and global limits hold, every refusal is counted (once per request,
not per retransmission), and what natedit holds per client is bounded.
bench/memory.py measures the bytes (per live call, at the 65,535-call ceiling).
"""

from __future__ import annotations

import gc
from collections import Counter
from ipaddress import IPv4Address

from natedit import Action, MessageType
from natedit.core.stream import EDIT_BACKLOG
from natedit.core.table import CONNECTION_SLACK, TIMER_FLOOR, TIMER_SLACK, Call, ControlConnection
from natedit.core.translator import Translator
from natedit.core.wire import TCP_ACK, TCP_FIN, TCP_SYN, build_tcp
from tests.pptp_flows import (
    IN,
    OUT,
    SERVER,
    Conversation,
    assert_table_consistent,
    establish,
    make_translator,
    msg,
    run_timers,
)

MT = MessageType
GREEDY = "10.0.0.66"


def opened(tr: Translator, client: str, port: int = 40000) -> Conversation:
    conv = Conversation(tr, client, client_port=port)
    conv.open()
    return conv


def hammer(tr: Translator, conv: Conversation, n: int, per_segment: int = 4) -> Counter[str]:
    """``n`` Outgoing-Call-Requests as fast as they go, ``per_segment`` per segment; each
    refused segment is retransmitted twice, then given up. Verdict reasons by count."""
    seen: Counter[str] = Counter()
    cid = 0x0100
    for _ in range(0, n, per_segment):
        payload = b"".join(msg(MT.OUTGOING_CALL_REQUEST, call_id=cid + k)
                           for k in range(per_segment))
        cid += per_segment
        v = conv.send(OUT, payload)
        seen[v.reason or "accepted"] += 1
        if not v.accepted:
            for _ in range(2):
                seen[conv.feed(OUT, conv.segment(OUT, payload)).reason or "accepted"] += 1
            # a real client would retransmit forever; this one skips ahead, and natedit is
            # put on the new position as if it had synchronised there
            conv.out_seq += len(payload)
            tr.table.connections[_key(conv)].streams[OUT].resync(conv.out_seq)
    return seen


def _key(conv: Conversation) -> tuple[bytes, int, bytes, int]:
    return (IPv4Address(conv.client).packed, conv.client_port, IPv4Address(SERVER).packed, 1723)


def test_one_client_cannot_take_more_than_its_share() -> None:
    tr = make_translator(max_calls_per_client=16, max_calls=40)
    greedy = opened(tr, GREEDY)
    seen = hammer(tr, greedy, 64)
    assert tr.table.per_client[_key(greedy)[0]] == 16  # the per-client limit holds
    assert seen["refused:client_limit"] == 3 * 12  # 12 refused requests, each sent 3 times
    assert tr.stats.calls_refused == Counter(client_limit=12)  # counted once per request
    # the others still get calls, up to the table's limit
    for i in range(24):
        establish(opened(tr, f"10.0.1.{i}"), 0x1234, 0x80 + i)
    assert len(tr.table) == 40
    late = opened(tr, "10.0.2.1")
    v = late.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    assert (v.action, v.reason) == (Action.DROP, "refused:table_full")
    assert tr.stats.calls_refused["table_full"] == 1
    assert_table_consistent(tr.table, one_to_one=tr.table.relaxed == 0)


def test_greedy_client_on_many_connections() -> None:
    tr = make_translator(max_calls_per_client=8)
    for port in range(40000, 40012):
        conv = opened(tr, GREEDY, port)
        hammer(tr, conv, 4)
    assert tr.table.per_client[_key(conv)[0]] == 8
    assert tr.stats.calls_refused["client_limit"] == 10  # one segment of 4 per connection
    establish(opened(tr, "10.0.0.5"), 0x1234, 0x80)
    assert tr.table.per_client[_key(Conversation(tr, "10.0.0.5"))[0]] == 1


def test_greedy_client_cannot_take_the_call_id_pool() -> None:
    """A pool of 48 public Call IDs toward one server: the greedy client gets its 16,
    two others get theirs; the greedy one never had the pool."""
    tr = make_translator(call_id_first=0x1000, call_id_last=0x102F, max_calls_per_client=16)
    hammer(tr, opened(tr, GREEDY), 64, per_segment=1)
    for client in ("10.0.0.5", "10.0.0.6"):
        for port in range(16):
            establish(opened(tr, client, 41000 + port), 0x0100 + port, port)
    assert len(tr.table) == 48
    v = opened(tr, "10.0.0.7").send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    assert v.reason == "refused:pool_exhausted"
    assert_table_consistent(tr.table, one_to_one=tr.table.relaxed == 0)


def test_requests_that_never_get_a_reply_time_out() -> None:
    tr = make_translator(max_calls_per_client=16, request_timeout=60.0)
    conv = opened(tr, GREEDY)
    hammer(tr, conv, 16)
    assert len(tr.table) == 16
    run_timers(tr, 61.0)
    assert len(tr.table) == 0 and tr.stats.calls_released["request_timeout"] == 16


def test_one_client_cannot_fill_the_connection_table() -> None:
    tr = make_translator(max_calls_per_client=4, max_control_connections=64)
    limit = 4 + CONNECTION_SLACK
    verdicts: Counter[str] = Counter()
    for port in range(30000, 30100):  # SYNs as fast as it can
        v = tr.handle_packet(build_tcp(GREEDY, SERVER, port, 1723, 1, flags=TCP_SYN), OUT, 0.0)
        verdicts[v.reason or "accepted"] += 1
    assert verdicts == Counter(accepted=limit, client_connection_limit=100 - limit)
    assert tr.stats.verdicts[("drop", "client_connection_limit")] == 100 - limit
    establish(opened(tr, "10.0.0.5"), 0x1234, 0x80)  # the others still connect and call
    assert len(tr.table.connections) == limit + 1
    run_timers(tr, 301.0)  # idle connections are forgotten
    assert not tr.table.connections_per_client.get(_key(Conversation(tr, GREEDY))[0])


def test_rewrite_memory_per_stream_is_bounded() -> None:
    """A client naming its own live call over and over: every Call-Clear-Request is
    rewritten and remembered for retransmissions, but never more than EDIT_BACKLOG
    bytes per stream."""
    tr = make_translator()
    conv = opened(tr, GREEDY)
    establish(conv, 0x1234, 0x80)
    ccrq = msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234)
    for _ in range(40):
        assert conv.send(OUT, ccrq * 64).data is not None
    stream = tr.table.connections[_key(conv)].streams[OUT]
    assert len(stream.edits) == EDIT_BACKLOG
    assert len(stream._edits) <= EDIT_BACKLOG + EDIT_BACKLOG // 4
    # the latest are kept: a retransmission of the last segment is rewritten alike
    last = conv.segment(OUT, ccrq * 64, seq=conv.out_seq - len(ccrq) * 64)
    v = conv.feed(OUT, last)
    assert v.data is not None and v.data != last


def test_churn_leaves_nothing_behind() -> None:
    """5,000 calls set up and torn down (clear, disconnect, stop, FIN): no released call
    or connection is still referenced (the timer heap is rebuilt under churn), and the
    table holds only the one call that stays up."""
    tr = make_translator()
    keep = opened(tr, "10.0.0.5")
    establish(keep, 0x1234, 0x80)
    for i in range(5000):
        conv = opened(tr, f"10.0.1.{i % 200}", 20000 + i)
        establish(conv, 0x4000 + i % 7, 0x100 + i)
        if i % 2:
            conv.send(OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x4000 + i % 7))
            conv.send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x100 + i))
            conv.send(OUT, msg(MT.STOP_CONTROL_CONNECTION_REQUEST))
        conv.send(OUT, b"", flags=TCP_FIN | TCP_ACK)
        conv.send(IN, b"", flags=TCP_FIN | TCP_ACK)
    assert len(tr.table) == 1 and len(tr.table.connections) == 1
    assert len(tr.table.timers) <= TIMER_SLACK * 2 + TIMER_FLOOR
    gc.collect()
    assert sum(isinstance(o, Call | ControlConnection) for o in gc.get_objects()) <= (
        2 + TIMER_FLOOR)
    assert_table_consistent(tr.table)
