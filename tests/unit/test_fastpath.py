"""The kernel fast path's bookkeeping, against a stand-in for the BPF maps.

:class:`FakeMaps` keeps the two maps of the tc-BPF program (natedit_in,
natedit_out) the way the kernel does for the calls the fast path makes, and
lets a test play traffic into the element counters. What is checked: the maps
always equal what the call table says (established calls only), every change
of a turn goes in one batch, the program is attached only once its maps hold
the calls, counters reach the core (totals, per call, idle timers) also for
elements deleted between two readings, and a failed update is repaired by a
rebuild. tests/netns/test_kernel_program.py runs the program itself,
tests/netns/test_e2e_fastpath.py the whole datapath.
"""

from __future__ import annotations

import socket
import time

import pytest

from natedit import CallEstablished, CallReleased, Direction
from natedit.core.errors import NateditError
from natedit.core.table import CallState
from natedit.core.translator import Translator
from natedit.core.wire import MessageType
from natedit.fastpath import (
    SYNC_DUTY,
    SYNC_INTERVAL,
    Counts,
    FastPathError,
    InKey,
    KernelDatapath,
    OutKey,
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


def _ip(packed: bytes) -> str:
    return socket.inet_ntoa(packed)


class FakeMaps:
    """natedit_in and natedit_out as the kernel keeps them, key -> [value, packets,
    bytes] (None: nothing loaded); ``scripts`` records every call that went through
    (create, apply, attach)."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[tuple[object, ...], list[object]]] | None = None
        self.attached = False
        self.scripts: list[str] = []
        self.fail_next = 0
        self.closed = False

    def _fail(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise FastPathError("update natedit_in: injected")

    def _loaded(self) -> dict[str, dict[tuple[object, ...], list[object]]]:
        if self.maps is None:
            raise FastPathError("kernel datapath: maps not loaded")
        return self.maps

    def create(self) -> None:
        self._fail()
        self.maps, self.attached = {"in": {}, "out": {}}, False
        self.scripts.append("create")

    def attach(self) -> None:
        self._fail()
        self._loaded()
        self.attached = True
        self.scripts.append("attach")

    def apply(self, del_in: list[InKey], add_in: list[tuple[InKey, tuple[bytes, int]]],
              del_out: list[OutKey], add_out: list[tuple[OutKey, bytes]]) -> None:
        self._fail()
        maps = self._loaded()
        for key in del_in:
            maps["in"].pop(key, None)
        for okey in del_out:
            maps["out"].pop(okey, None)
        for key, value in add_in:
            maps["in"][key] = [value, 0, 0]
        for okey, public in add_out:
            maps["out"][okey] = [public, 0, 0]
        self.scripts.append("apply")

    def _counts(self, name: str) -> dict[tuple[object, ...], Counts]:
        return {k: (int(str(v[1])), int(str(v[2]))) for k, v in self._loaded()[name].items()}

    def read_in(self) -> dict[InKey, Counts]:
        self._fail()
        return self._counts("in")  # type: ignore[return-value]

    def read_out(self) -> dict[OutKey, Counts]:
        self._fail()
        return self._counts("out")  # type: ignore[return-value]

    def get(self, in_keys: list[InKey], out_keys: list[OutKey]) -> tuple[
            list[Counts | None], list[Counts | None]]:
        self._fail()
        ins, outs = self._counts("in"), self._counts("out")
        return [ins.get(k) for k in in_keys], [outs.get(k) for k in out_keys]

    def remove(self) -> None:
        self.maps, self.attached = None, False

    def close(self) -> None:
        self.remove()
        self.closed = True

    def _key(self, name: str, text: str) -> tuple[object, ...]:
        """The element a view key names (inbound: "server . Call ID", whatever the public
        address, which the nftables design's keys did not carry)."""
        words = text.split(" . ")
        key = (*(socket.inet_aton(w) for w in words[:-1]), int(words[-1]))
        if name != "in_daddr":
            return key
        [found] = [k for k in self._loaded()["in"] if k[1:] == key]
        return found

    def traffic(self, name: str, key: str, packets: int, nbytes: int) -> None:
        element = self._loaded()["in" if name == "in_daddr" else "out"][self._key(name, key)]
        element[1] = int(str(element[1])) + packets
        element[2] = int(str(element[2])) + nbytes

    def view(self) -> dict[str, dict[str, object]]:
        """The maps as the nftables design showed them (its tests' words)."""
        maps = self._loaded()
        ins: dict[str, tuple[bytes, int]] = {
            f"{_ip(k[1])} . {k[2]}": v[0] for k, v in maps["in"].items()}  # type: ignore[arg-type,misc]
        outs = {f"{_ip(k[0])} . {_ip(k[1])} . {k[2]}": _ip(v[0])  # type: ignore[arg-type]
                for k, v in maps["out"].items()}
        return {"in_daddr": {k: _ip(v[0]) for k, v in ins.items()},
                "in_cid": {k: str(v[1]) for k, v in ins.items()},
                "out_saddr": dict(outs)}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(**policy: object) -> tuple[Translator, FakeMaps, KernelDatapath, Clock, list[str]]:
    tr = make_translator(**policy)
    nft, clock, reports = FakeMaps(), Clock(), list[str]()
    fast = KernelDatapath(tr, maps=nft, report=reports.append, clock=clock)
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


def test_the_program_is_attached_only_once_its_maps_hold_the_calls() -> None:
    tr, nft, fast, _, _ = setup()
    new_call(tr, "10.0.0.11", 0x1234, 0)
    attached_with: list[int] = []
    attach = nft.attach

    def watch() -> None:
        attached_with.append(len(nft._loaded()["in"]))
        attach()

    nft.attach = watch  # type: ignore[method-assign]
    fast.start()
    assert nft.scripts == ["create", "apply", "attach"] and attached_with == [1]


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
    assert len(nft.scripts) == 3 and fast.calls == 1  # load, the elements, attach


def test_calls_come_and_go_with_the_table_one_transaction_per_turn() -> None:
    tr, nft, fast, _, _ = setup()
    fast.start()
    a, pa = new_call(tr, "10.0.0.11", 0x1234, 0)
    b, pb = new_call(tr, "10.0.0.12", 0x1234, 128, port=40001)
    fast.note([e for c in (a, b) for v in c.verdicts for e in v.events])
    fast.flush()
    assert len(nft.scripts) == 3  # load and attach, then both calls at once
    assert nft.view()["in_daddr"] == {f"{SERVER} . {pa}": "10.0.0.11",
                                      f"{SERVER} . {pb}": "10.0.0.12"}
    assert nft.view()["out_saddr"] == {f"10.0.0.11 . {SERVER} . 0": PUBLIC,
                                       f"10.0.0.12 . {SERVER} . 128": PUBLIC}
    fast.flush()
    assert len(nft.scripts) == 3  # nothing changed: no batch
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


def test_a_failed_start_leaves_nothing_loaded() -> None:
    tr, nft, fast, _, _ = setup()
    new_call(tr, "10.0.0.11", 0x1234, 0)
    original = nft.attach

    def refuse() -> None:
        raise FastPathError("datapath kernel needs cls_bpf (CONFIG_NET_CLS_BPF) on out0")

    nft.attach = refuse  # type: ignore[method-assign]
    with pytest.raises(FastPathError, match="cls_bpf"):
        fast.start()
    fast.close()
    assert nft.maps is None and nft.closed
    nft.attach = original  # type: ignore[method-assign]


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
    slow_read = nft.read_in

    def read_in() -> dict[InKey, Counts]:
        time.sleep(0.12)  # (the nftables design read two maps of 0.06 s)
        return slow_read()

    nft.read_in = read_in  # type: ignore[method-assign]
    clock.now = 10.0
    fast.sync(clock.now)
    interval = fast.next_sync - clock.now
    assert interval >= 0.12 * SYNC_DUTY > SYNC_INTERVAL
    assert not fast.stale(clock.now + interval / 2)
    assert fast.stale(clock.now + interval + 0.1)
