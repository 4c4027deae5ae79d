"""The kernel fast path's bookkeeping, against a stand-in for nftables.

:class:`FakeNft` keeps the three maps of ``ip natedit_fast`` the way the kernel
does for the commands the fast path sends (a transaction applies whole or not
at all; adding a key that exists and deleting one that does not fail) and
lets a test play traffic into the element counters. What is checked: the
maps always equal what the call table says (established calls only), every
change of a turn goes in one transaction, counters reach the core (totals,
per call, idle timers) also for elements deleted between two readings, and a
failed transaction is repaired by a rebuild. tests/netns/test_e2e_fastpath.py runs
the real thing.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from natedit import CallEstablished, CallReleased, Direction
from natedit.core.errors import NateditError
from natedit.core.table import CallState
from natedit.core.translator import Translator
from natedit.core.wire import MessageType
from natedit.fastpath import (
    NFT_TABLE,
    SYNC_DUTY,
    SYNC_INTERVAL,
    FastPathError,
    KernelDatapath,
    parse_map_counters,
    render_table,
)
from natedit.worker import Dispatcher
from tests.pptp_flows import (
    IN,
    OUT,
    PUBLIC,
    SERVER,
    Conversation,
    establish,
    forward,
    make_translator,
    msg,
)

MT = MessageType
_ELEMENTS = re.compile(rf"^(add|delete|get) element ip {NFT_TABLE} (\w+) \{{ (.*) \}}$")


class FakeNft:
    """The maps of ``ip natedit_fast`` as the kernel keeps them, key text -> [value,
    packets, bytes]; ``scripts`` records every transaction that went through."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, list[object]]] | None = None
        self.scripts: list[str] = []
        self.fail_next = 0
        self.closed = False

    def run(self, commands: str, *, json_output: bool = False, handles: bool = False) -> str:
        if self.fail_next:
            self.fail_next -= 1
            raise FastPathError("nft: Could not process rule: injected")
        maps = None if self.maps is None else {k: {e: list(v) for e, v in m.items()}
                                               for k, m in self.maps.items()}
        out: list[str] = []
        lines = commands.splitlines()
        if f"table ip {NFT_TABLE} {{" in lines:  # (re)creation: empty maps
            maps = {"in_daddr": {}, "in_cid": {}, "out_saddr": {}}
            lines = lines[lines.index("}") + 1:] if "}" in lines else []
        elif commands == f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n":
            maps, lines = None, []
        for line in lines:
            if not line.strip():
                continue
            if line == f"list table ip {NFT_TABLE}" and maps is not None:
                assert handles
                out.append(f"table ip {NFT_TABLE} {{ # handle 7\n}}")
                continue
            if line.startswith("list map"):
                assert json_output and maps is not None
                out.append(self._json(maps, line.split()[-1]))
                continue
            match = _ELEMENTS.match(line)
            assert match, line
            verb, name, body = match.groups()
            if maps is None:
                raise FastPathError("nft: No such file or directory")
            m = maps[name]
            for item in body.split(", "):
                key, _, value = item.partition(" : ")
                if verb == "add":
                    if key in m:
                        raise FastPathError("nft: File exists")
                    m[key] = [value, 0, 0]
                elif key not in m:
                    raise FastPathError("nft: No such file or directory")
                elif verb == "delete":
                    del m[key]
                else:
                    v, p, b = m[key]
                    out.append(f"elements = {{ {key} counter packets {p} bytes {b} : {v} }}")
        self.maps = maps
        self.scripts.append(commands)
        return "\n".join(out)

    @staticmethod
    def _json(maps: dict[str, dict[str, list[object]]], name: str) -> str:
        elems = []
        for key, (value, p, b) in maps[name].items():
            words = key.split(" . ")
            parts: list[object] = [*words[:-1], int(words[-1])]
            elems.append([{"elem": {"val": {"concat": parts},
                                    "counter": {"packets": p, "bytes": b}}}, value])
        body = {"family": "ip", "name": name, "table": NFT_TABLE, "elem": elems}
        return json.dumps({"nftables": [{"metainfo": {}}, {"map": body}]})

    def traffic(self, name: str, key: str, packets: int, nbytes: int) -> None:
        assert self.maps is not None
        element = self.maps[name][key]
        element[1] = int(str(element[1])) + packets
        element[2] = int(str(element[2])) + nbytes

    def close(self) -> None:
        self.closed = True

    def view(self) -> dict[str, dict[str, object]]:
        assert self.maps is not None
        return {name: {k: v[0] for k, v in m.items()} for name, m in self.maps.items()}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(**policy: object) -> tuple[Translator, FakeNft, KernelDatapath, Clock, list[str]]:
    tr = make_translator(**policy)
    nft, clock, reports = FakeNft(), Clock(), list[str]()
    fast = KernelDatapath(tr, nft=nft, report=reports.append, clock=clock, guard=None)
    return tr, nft, fast, clock, reports


def new_call(tr: Translator, client: str, client_call_id: int, server_call_id: int,
             port: int = 40000) -> tuple[Conversation, int]:
    conv = Conversation(tr, client, client_port=port)
    conv.open()
    return conv, establish(conv, client_call_id, server_call_id)


def run_conv(tr: Translator, conv: Conversation, fast: KernelDatapath) -> None:
    """What the worker does with a turn's events: note them, flush once."""
    events = [e for v in conv.verdicts for e in v.events]
    conv.verdicts.clear()
    fast.note(events)
    fast.flush()


def test_table_script_is_what_the_e2e_tests_load() -> None:
    script = render_table(bytes([198, 51, 100, 1]))
    assert "flags" not in script  # nft 1.0.6 cannot print a flagged table as JSON
    assert "ip daddr 198.51.100.1 ip protocol gre" in script
    assert script.startswith(f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n")


def test_start_installs_every_established_call_and_only_those() -> None:
    tr, nft, fast, _, _ = setup()
    _conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    requested = Conversation(tr, "10.0.0.12", client_port=40001)
    requested.open()
    forward(requested, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    fast.start()
    assert nft.view() == {
        "in_daddr": {f"{SERVER} . {public}": "10.0.0.11"},
        "in_cid": {f"{SERVER} . {public}": "4660"},
        "out_saddr": {f"10.0.0.11 . {SERVER} . 0": PUBLIC},
    }
    assert len(nft.scripts) == 3 and fast.calls == 1  # table, its handle, the elements


def test_calls_come_and_go_with_the_table_one_transaction_per_turn() -> None:
    tr, nft, fast, _, _ = setup()
    fast.start()
    a, pa = new_call(tr, "10.0.0.11", 0x1234, 0)
    b, pb = new_call(tr, "10.0.0.12", 0x1234, 128, port=40001)
    fast.note([e for c in (a, b) for v in c.verdicts for e in v.events])
    fast.flush()
    assert len(nft.scripts) == 3  # the table and its handle, then both calls at once
    assert nft.view()["in_daddr"] == {f"{SERVER} . {pa}": "10.0.0.11",
                                      f"{SERVER} . {pb}": "10.0.0.12"}
    assert nft.view()["out_saddr"] == {f"10.0.0.11 . {SERVER} . 0": PUBLIC,
                                       f"10.0.0.12 . {SERVER} . 128": PUBLIC}
    fast.flush()
    assert len(nft.scripts) == 3  # nothing changed: no transaction
    # the server ends a's call: its elements go, b's stay
    a.verdicts.clear()
    forward(a, IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0))
    events = [e for v in a.verdicts for e in v.events]
    assert any(isinstance(e, CallReleased) for e in events)
    fast.note(events)
    fast.flush()
    assert nft.view() == {"in_daddr": {f"{SERVER} . {pb}": "10.0.0.12"},
                          "in_cid": {f"{SERVER} . {pb}": "4660"},
                          "out_saddr": {f"10.0.0.12 . {SERVER} . 128": PUBLIC}}
    assert fast.calls == 1


def test_counters_reach_the_core_and_keep_calls_alive() -> None:
    tr, nft, fast, clock, _ = setup(call_idle_timeout=10.0)
    _conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    fast.start()
    nft.traffic("in_daddr", f"{SERVER} . {public}", 5, 500)
    nft.traffic("out_saddr", f"10.0.0.11 . {SERVER} . 0", 3, 240)
    clock.now = 8.0
    fast.sync(clock.now)
    assert tr.stats.gre_packets == [3, 5] and tr.stats.gre_bytes == [240, 500]
    (call,) = tr.table.calls()
    assert call.gre_packets == [3, 5] and call.last_seen == 8.0
    assert tr.handle_timer(12.0) == []  # not idle: the kernel carried its GRE at 8
    fast.sync(12.0)  # nothing new: counted once only
    assert tr.stats.gre_packets == [3, 5]
    (released,) = tr.handle_timer(18.0)
    assert isinstance(released, CallReleased) and released.reason == "idle"
    fast.note([released])
    fast.flush()
    assert nft.view()["in_daddr"] == {} and nft.view()["out_saddr"] == {}


def test_an_element_deleted_between_two_readings_is_counted_first() -> None:
    tr, nft, fast, _, _ = setup()
    conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    fast.start()
    nft.traffic("in_daddr", f"{SERVER} . {public}", 7, 700)
    nft.traffic("out_saddr", f"10.0.0.11 . {SERVER} . 0", 2, 200)
    conv.verdicts.clear()
    forward(conv, IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0))
    run_conv(tr, conv, fast)
    assert tr.stats.gre_packets == [2, 7] and tr.stats.gre_bytes == [200, 700]
    assert nft.view()["in_daddr"] == {}


def test_a_new_server_call_id_moves_the_outbound_element() -> None:
    tr, nft, fast, _, _ = setup()
    conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    fast.start()
    conv.verdicts.clear()
    forward(conv, IN, msg(MT.OUTGOING_CALL_REPLY, call_id=77, peer_call_id=public))
    assert any(isinstance(e, CallEstablished) for v in conv.verdicts for e in v.events)
    run_conv(tr, conv, fast)
    assert nft.view()["out_saddr"] == {f"10.0.0.11 . {SERVER} . 77": PUBLIC}


def test_a_failed_transaction_is_repaired_by_a_rebuild() -> None:
    tr, nft, fast, _, reports = setup()
    fast.start()
    conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    nft.fail_next = 1
    run_conv(tr, conv, fast)
    assert reports and "rebuilding" in reports[0]
    assert nft.view()["in_daddr"] == {f"{SERVER} . {public}": "10.0.0.11"}
    assert fast.calls == 1


def test_a_failed_rebuild_leaves_gre_to_the_queue_and_retries() -> None:
    tr, nft, fast, clock, reports = setup()
    fast.start()
    conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    nft.fail_next = 2  # the update and the rebuild
    run_conv(tr, conv, fast)
    assert nft.maps is None and fast.calls == 0  # no table: the queue translates
    assert len(reports) == 2
    fast.flush()
    assert nft.maps is None  # not before the back-off
    clock.now = 10.0
    fast.flush()
    assert nft.view()["in_daddr"] == {f"{SERVER} . {public}": "10.0.0.11"}


def test_stop_reads_the_counters_then_deletes_the_table() -> None:
    tr, nft, fast, _, _ = setup()
    _conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    fast.start()
    nft.traffic("in_daddr", f"{SERVER} . {public}", 4, 400)
    fast.stop()
    assert tr.stats.gre_packets[Direction.INBOUND] == 4
    assert nft.maps is None and nft.closed


def test_closing_calls_stay_in_the_kernel_until_released() -> None:
    tr, _nft, fast, _, _ = setup()
    conv, _public = new_call(tr, "10.0.0.11", 0x1234, 0)
    fast.start()
    forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    (call,) = tr.table.calls()
    assert call.state is CallState.CLOSING
    run_conv(tr, conv, fast)
    assert fast.calls == 1


def test_the_dispatcher_reads_counters_before_an_idle_timer() -> None:
    tr, nft, fast, clock, _ = setup(call_idle_timeout=10.0)
    _conv, public = new_call(tr, "10.0.0.11", 0x1234, 0)
    fast.start()
    dispatcher = Dispatcher(tr, clock=clock)
    dispatcher.fastpath = fast
    for second in range(1, 40):  # GRE flows through the kernel only
        clock.now = float(second)
        nft.traffic("in_daddr", f"{SERVER} . {public}", 1, 100)
        deadline = dispatcher.run_timers()
        assert deadline is not None and deadline <= clock.now + SYNC_INTERVAL
        dispatcher.flush()
    assert len(tr.table) == 1  # never idle
    assert tr.stats.gre_packets[Direction.INBOUND] >= 35
    for second in range(40, 60):  # no GRE since 39: idle, released, gone from the kernel
        clock.now = float(second)
        dispatcher.run_timers()
        dispatcher.flush()
        if not len(tr.table):
            break
    # released within the idle timeout plus one reading of the counters after the last GRE
    assert clock.now <= 39 + SYNC_INTERVAL + 10.0
    assert len(tr.table) == 0 and nft.view()["in_daddr"] == {}


def test_parse_map_counters() -> None:
    text = json.dumps({"nftables": [{"metainfo": {}}, {"map": {"elem": [
        [{"elem": {"val": {"concat": ["198.51.100.2", 4660]},
                   "counter": {"packets": 3, "bytes": 30}}}, "10.0.0.11"]]}}]})
    assert parse_map_counters(text) == {("198.51.100.2", 4660): (3, 30)}
    assert parse_map_counters("") == {}


def test_fast_path_error_is_a_natedit_error() -> None:
    assert issubclass(FastPathError, NateditError)


def test_gre_routes_of_the_core() -> None:
    tr = make_translator()
    _conv, public = new_call(tr, "10.0.0.11", 0x1234, 9)
    (route,) = tr.gre_routes()
    assert (route.client_call_id, route.server_call_id, route.public_call_id) == (0x1234, 9,
                                                                                  public)
    assert route.outbound and tr.gre_route_outbound(
        (route.client_ip, route.server_ip, 9)) == route
    tr.note_gre((route.public_ip, route.server_ip, public), IN, 0, 0, 5.0)
    assert tr.stats.gre_packets == [0, 0]
    tr.note_gre((route.public_ip, route.server_ip, 999), OUT, 2, 20, 5.0)  # a call gone
    assert tr.stats.gre_packets == [2, 0]


@pytest.mark.parametrize("state", ["requested", "incoming"])
def test_calls_not_yet_established_have_no_route(state: str) -> None:
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.11")
    conv.open()
    if state == "requested":
        forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    else:
        forward(conv, IN, msg(MT.INCOMING_CALL_REQUEST, call_id=5))
        forward(conv, OUT, msg(MT.INCOMING_CALL_REPLY, call_id=0x1234, peer_call_id=5))
    assert tr.gre_routes() == []


def test_many_calls_are_read_less_often() -> None:
    """A slow reading (many calls) spaces the readings out: at most 1/SYNC_DUTY of the
    worker's time goes to them, before timers too."""
    tr, nft, fast, clock, _ = setup()
    new_call(tr, "10.0.0.11", 0x1234, 0)
    fast.start()
    slow_run = nft.run

    def run(commands: str, *, json_output: bool = False, handles: bool = False) -> str:
        if commands.startswith("list map"):
            time.sleep(0.06)
        return slow_run(commands, json_output=json_output, handles=handles)

    nft.run = run  # type: ignore[method-assign]
    clock.now = 10.0
    fast.sync(clock.now)
    interval = fast.next_sync - clock.now
    assert interval >= 0.12 * SYNC_DUTY > SYNC_INTERVAL
    assert not fast.stale(clock.now + interval / 2)
    assert fast.stale(clock.now + interval + 0.1)
