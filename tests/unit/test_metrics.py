"""natedit.metrics: every family through a fresh CollectorRegistry, the series cap, the
queue file, the HTTP endpoint and ``natedit calls``.

The translator is driven with crafted packets (tests/pptp_flows.py) so that each
family has something to count; the values are read back with ``get_sample_value``.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from natedit import NateditError, cli, metrics
from natedit.core.errors import (
    ACL_REFUSALS,
    DropReason,
    Malformed,
    PassReason,
    Refusal,
    ReleaseReason,
)
from natedit.core.policy import Datapath, Policy, WorkerDown
from natedit.core.translator import Translator
from natedit.core.wire import TCP_ACK, MessageType, build_gre
from natedit.eventstream import EventHub
from natedit.metrics import NateditCollector, QueueStats, parse_queue_stats
from natedit.status import PolicyStatus
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
    msg,
)

MT = MessageType
REPO = Path(__file__).resolve().parents[2]

# Two queues as the kernel prints them ("%5u %6u %5u %1u %5u %5u %5u %8u %2d"): the
# outbound one bound by port 4242 with 3 waiting, the inbound one with drops.
PROC_TEXT = (
    " 1723   4242     3 2 65535     0     0      117  1\n"
    " 1724   4243     0 2 65535    12     5     4096  1\n"
)

FAMILIES = {
    "natedit_build_info", "natedit_policy_info", "natedit_policy_loaded_timestamp_seconds",
    "natedit_policy_reloads_total", "natedit_policy_reload_failed", "natedit_calls_limit",
    "natedit_calls_per_client_limit", "natedit_control_connections_limit",
    "natedit_call_info_limit", "natedit_on_worker_down", "natedit_worker_errors_total",
    "natedit_queue_bound",
    "natedit_queue_length", "natedit_queue_packets_total", "natedit_queue_dropped_total",
    "natedit_queue_user_dropped_total", "natedit_queue_length_max", "natedit_call_info",
    "natedit_call_info_omitted_calls", "natedit_calls", "natedit_control_connections",
    "natedit_clients", "natedit_call_ids_in_use", "natedit_call_id_pool_size",
    "natedit_call_id_blocks_in_use", "natedit_call_id_fullest_block",
    "natedit_calls_mapped_total", "natedit_calls_high_byte_relaxed_total",
    "natedit_calls_refused_total", "natedit_calls_released_total",
    "natedit_calls_restored_total", "natedit_connections_refused_total",
    "natedit_control_messages_total", "natedit_call_id_rewrites_total",
    "natedit_gre_packets_total", "natedit_gre_bytes_total", "natedit_packets_dropped_total",
    "natedit_packets_passed_total", "natedit_malformed_packets_total",
    "natedit_event_subscribers", "natedit_events_lost_total",
    "natedit_datapath", "natedit_kernel_gre_packets_total", "natedit_kernel_calls",
}
"""Every family natedit's collector exports (sample names: counters with _total)."""


def registry(collector: NateditCollector) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg


def collector(tr: Translator | None, **kw: object) -> NateditCollector:
    kw.setdefault("queue_stats_reader", lambda: parse_queue_stats(PROC_TEXT))
    return NateditCollector(tr, kw.pop("counts", Counter()),  # type: ignore[arg-type]
                            kw.pop("status", PolicyStatus()), version="9.9",  # type: ignore[arg-type]
                            **kw)  # type: ignore[arg-type]


def busy_translator() -> tuple[Translator, list[int]]:
    """Three calls on a pool of three (client 10.0.0.5 twice, 10.0.0.6 once), GRE both
    ways, one refused call, one released call, and a packet of each foreign kind."""
    tr = make_translator(call_id_first=1, call_id_last=3)
    publics = []
    convs = []
    for i, client in enumerate(("10.0.0.5", "10.0.0.5", "10.0.0.6")):
        conv = Conversation(tr, client, client_port=40000 + i)
        conv.open()
        publics.append(establish(conv, 0x1234, 100 + i))
        convs.append(conv)
    assert tr.handle_packet(gre_in(publics[0], b"\xff\x03" * 10), IN, 1).data is not None
    assert tr.handle_packet(gre_out("10.0.0.5", 100), OUT, 1).data is not None
    # a fourth call: the pool is full
    extra = Conversation(tr, "10.0.0.7", client_port=41000)
    extra.open()
    assert not extra.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=7)).accepted
    # the server ends the third call: Call-Disconnect-Notify with its own Call ID
    convs[2].send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=102))
    # foreign and bad input
    tr.handle_packet(gre_in(999), IN, 1)  # no_call (drop)
    tr.handle_packet(build_gre(SERVER, "203.0.113.9", 1, b"x"), IN, 1)  # not_ours (pass)
    bad = bytearray(msg(MT.SET_LINK_INFO, peer_call_id=1))
    bad[4:8] = b"\0\0\0\0"  # bad_cookie (drop)
    assert not convs[0].send(OUT, bytes(bad)).accepted
    tr.handle_packet(b"\x45\x00", IN, 1)  # short_ip (drop)
    return tr, publics


@pytest.fixture
def busy() -> tuple[Translator, list[int]]:
    return busy_translator()


def test_every_family_is_exported(busy: tuple[Translator, list[int]]) -> None:
    tr, _ = busy
    reg = registry(collector(tr, queue_maxlen=4096, extra=(EventHub(),)))
    names = {m.name + ("_total" if m.type == "counter" else "")
             + ("_info" if m.type == "info" else "") for m in reg.collect()}
    assert names == FAMILIES


def test_mapping_table_series(busy: tuple[Translator, list[int]]) -> None:
    tr, publics = busy
    reg = registry(collector(tr))
    for i, client in enumerate(("10.0.0.5", "10.0.0.5")):
        labels = {"client_address": client, "client_call_id": str(0x1234),
                  "server_address": SERVER, "server_call_id": str(100 + i),
                  "public_address": PUBLIC, "public_call_id": str(publics[i]),
                  "state": "established"}
        assert reg.get_sample_value("natedit_call_info", labels) == 1
    series = [s for m in reg.collect() if m.name == "natedit_call_info" for s in m.samples]
    assert len(series) == 2  # the third call was released
    assert reg.get_sample_value("natedit_call_info_omitted_calls") == 0
    assert reg.get_sample_value("natedit_call_info_limit") == 10000


def test_requested_call_has_no_server_call_id() -> None:
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=42))
    reg = registry(collector(tr))
    (sample,) = [s for m in reg.collect() if m.name == "natedit_call_info" for s in m.samples]
    assert sample.labels["state"] == "requested"
    assert sample.labels["server_call_id"] == ""
    assert sample.labels["client_call_id"] == "42"
    assert reg.get_sample_value("natedit_calls", {"state": "requested"}) == 1


@pytest.mark.parametrize("cap", [0, 1, 4, 5, 9])
def test_series_cap(cap: int) -> None:
    tr = make_translator(metrics_call_series=cap)
    for i in range(5):
        conv = Conversation(tr, f"10.0.0.{10 + i}")
        conv.open()
        establish(conv, 7, 100 + i)
    reg = registry(collector(tr))
    series = [s for m in reg.collect() if m.name == "natedit_call_info" for s in m.samples]
    assert len(series) == min(cap, 5)
    # oldest first: the kept calls are the first ones mapped
    assert [s.labels["client_address"] for s in series] == [
        f"10.0.0.{10 + i}" for i in range(min(cap, 5))]
    assert reg.get_sample_value("natedit_call_info_omitted_calls") == max(0, 5 - cap)
    assert reg.get_sample_value("natedit_call_info_limit") == cap
    assert reg.get_sample_value("natedit_calls", {"state": "established"}) == 5  # all counted


def test_live_calls_connections_pool(busy: tuple[Translator, list[int]]) -> None:
    tr, _ = busy
    reg = registry(collector(tr))
    get = reg.get_sample_value
    assert get("natedit_calls", {"state": "established"}) == 2
    for state in ("requested", "incoming", "closing"):
        assert get("natedit_calls", {"state": state}) == 0
    assert get("natedit_control_connections") == len(tr.table.connections) == 4
    assert get("natedit_clients") == 1  # 10.0.0.6's call was released
    assert get("natedit_call_ids_in_use",
               {"public_address": PUBLIC, "server_address": SERVER}) == 2
    assert get("natedit_call_id_pool_size") == 3
    # call_ids 1..3: one block of 256, holding both live calls
    assert get("natedit_call_id_blocks_in_use",
               {"public_address": PUBLIC, "server_address": SERVER}) == 1
    assert get("natedit_call_id_fullest_block",
               {"public_address": PUBLIC, "server_address": SERVER}) == 2
    assert get("natedit_calls_limit") == 65535
    assert get("natedit_calls_per_client_limit") == 256
    assert get("natedit_control_connections_limit") == 16384


def test_calls_mapped_refused_released(busy: tuple[Translator, list[int]]) -> None:
    tr, _ = busy
    get = registry(collector(tr)).get_sample_value
    assert get("natedit_calls_mapped_total") == 3
    assert get("natedit_calls_refused_total", {"reason": "pool_exhausted"}) == 1
    assert get("natedit_calls_refused_total", {"reason": "client_limit"}) == 0
    assert get("natedit_calls_released_total", {"reason": "disconnect"}) == 1
    for reason in metrics.RELEASE_REASONS:
        assert get("natedit_calls_released_total", {"reason": reason}) is not None
    assert get("natedit_calls_high_byte_relaxed_total") == 0
    assert get("natedit_calls_restored_total") == 0
    assert get("natedit_connections_refused_total", {"reason": "client_denied"}) == 0


def test_control_messages_and_rewrites(busy: tuple[Translator, list[int]]) -> None:
    tr, _ = busy
    get = registry(collector(tr)).get_sample_value
    assert get("natedit_control_messages_total",
               {"direction": "outbound", "message_type": "outgoing_call_request"}) == 3
    assert get("natedit_control_messages_total",
               {"direction": "inbound", "message_type": "outgoing_call_reply"}) == 3
    assert get("natedit_control_messages_total",
               {"direction": "inbound", "message_type": "call_disconnect_notify"}) == 1
    assert get("natedit_control_messages_total",  # exported at 0 from the start
               {"direction": "outbound", "message_type": "echo_request"}) == 0
    assert get("natedit_call_id_rewrites_total",
               {"message_type": "outgoing_call_request", "field": "new"}) == 3
    assert get("natedit_call_id_rewrites_total",
               {"message_type": "outgoing_call_reply", "field": "peer"}) == 3
    assert get("natedit_call_id_rewrites_total",
               {"message_type": "call_disconnect_notify", "field": "disconnect"}) == 1
    assert get("natedit_call_id_rewrites_total",
               {"message_type": "set_link_info", "field": "peer"}) == 0


def test_gre(busy: tuple[Translator, list[int]]) -> None:
    tr, _ = busy
    get = registry(collector(tr)).get_sample_value
    assert get("natedit_gre_packets_total", {"direction": "inbound"}) == 1
    assert get("natedit_gre_packets_total", {"direction": "outbound"}) == 1
    assert get("natedit_gre_bytes_total", {"direction": "inbound"}) == len(
        gre_in(1, b"\xff\x03" * 10))
    assert get("natedit_gre_bytes_total", {"direction": "outbound"}) == len(
        gre_out("10.0.0.5", 100))


def test_drops_passes_malformed(busy: tuple[Translator, list[int]]) -> None:
    tr, _ = busy
    get = registry(collector(tr, counts=Counter(packet_error=2))).get_sample_value
    assert get("natedit_packets_dropped_total", {"reason": "no_call"}) == 1
    assert get("natedit_packets_dropped_total", {"reason": "bad_cookie"}) == 1
    assert get("natedit_packets_dropped_total", {"reason": "short_ip"}) == 1
    assert get("natedit_packets_dropped_total", {"reason": "refused:pool_exhausted"}) == 1
    assert get("natedit_packets_dropped_total", {"reason": "packet_error"}) == 2
    assert get("natedit_packets_dropped_total", {"reason": "gap"}) == 0
    assert get("natedit_packets_passed_total", {"reason": "not_ours"}) == 1
    assert get("natedit_packets_passed_total", {"reason": "unsynced"}) == 0
    assert get("natedit_malformed_packets_total", {"reason": "bad_cookie", "action": "drop"}) == 1
    assert get("natedit_malformed_packets_total", {"reason": "short_ip", "action": "drop"}) == 1
    assert get("natedit_malformed_packets_total", {"reason": "bad_length", "action": "drop"}) == 0
    assert get("natedit_packets_passed_total", {"reason": "bad_cookie"}) is None


def test_malformed_pass_policy() -> None:
    from natedit import MalformedAction

    tr = make_translator(malformed=MalformedAction.PASS)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    bad = bytearray(msg(MT.START_CONTROL_CONNECTION_REQUEST))
    bad[4:8] = b"\0\0\0\0"
    assert conv.send(OUT, bytes(bad)).accepted
    get = registry(collector(tr)).get_sample_value
    assert get("natedit_packets_passed_total", {"reason": "bad_cookie"}) == 1
    assert get("natedit_packets_passed_total", {"reason": "bad_length"}) == 0
    assert get("natedit_packets_dropped_total", {"reason": "bad_length"}) is None
    assert get("natedit_malformed_packets_total",
               {"reason": "bad_cookie", "action": "accept"}) == 1


def test_worker_errors() -> None:
    counts = Counter(packet_error=3, timer_error=1)
    get = registry(collector(make_translator(), counts=counts)).get_sample_value
    assert get("natedit_worker_errors_total", {"kind": "packet_error"}) == 3
    assert get("natedit_worker_errors_total", {"kind": "timer_error"}) == 1
    counts["timer_error"] += 1  # read live at every scrape
    assert get("natedit_worker_errors_total", {"kind": "timer_error"}) == 2


def test_queue_families() -> None:
    reg = registry(collector(make_translator(), queue_maxlen=4096))
    get = reg.get_sample_value
    out = {"queue": "1723", "direction": "outbound"}
    inb = {"queue": "1724", "direction": "inbound"}
    assert get("natedit_queue_bound", out) == 1
    assert get("natedit_queue_length", out) == 3
    assert get("natedit_queue_packets_total", out) == 117
    assert get("natedit_queue_dropped_total", inb) == 12
    assert get("natedit_queue_user_dropped_total", inb) == 5
    assert get("natedit_queue_packets_total", inb) == 4096
    assert get("natedit_queue_length_max") == 4096


def test_queue_not_bound() -> None:
    reg = registry(collector(make_translator(), queue_stats_reader=dict))
    assert reg.get_sample_value("natedit_queue_bound",
                                {"queue": "1724", "direction": "inbound"}) == 0
    assert reg.get_sample_value("natedit_queue_dropped_total",
                                {"queue": "1724", "direction": "inbound"}) is None

    def broken() -> dict[int, QueueStats]:
        raise PermissionError("no")

    reg = registry(collector(make_translator(), queue_stats_reader=broken))
    assert reg.get_sample_value("natedit_queue_bound",
                                {"queue": "1723", "direction": "outbound"}) == 0


def test_parse_queue_stats() -> None:
    parsed = parse_queue_stats(PROC_TEXT + "garbage\n 1 2 3\n")
    assert parsed == {
        1723: QueueStats(1723, 4242, 3, 2, 65535, 0, 0, 117),
        1724: QueueStats(1724, 4243, 0, 2, 65535, 12, 5, 4096),
    }
    assert metrics.read_queue_stats("/nonexistent/nfnetlink_queue") == {}


def test_policy_status() -> None:
    status = PolicyStatus(source="/etc/natedit.yaml", loaded_at=1700000000.5)
    reg = registry(collector(make_translator(), status=status))
    get = reg.get_sample_value
    assert get("natedit_policy_info", {"source": "/etc/natedit.yaml"}) == 1
    assert get("natedit_policy_loaded_timestamp_seconds") == 1700000000.5
    assert get("natedit_policy_reloads_total", {"outcome": "ok"}) == 0
    assert get("natedit_policy_reloads_total", {"outcome": "failed"}) == 0
    assert get("natedit_policy_reload_failed") == 0
    status.reloads["ok"] += 2
    status.reloads["failed"] += 1
    status.last_error = "policy.yaml: max_calls: expected at least 1, found 0"
    assert get("natedit_policy_reloads_total", {"outcome": "ok"}) == 2
    assert get("natedit_policy_reloads_total", {"outcome": "failed"}) == 1
    assert get("natedit_policy_reload_failed") == 1
    builtin = registry(collector(make_translator())).get_sample_value
    assert builtin("natedit_policy_info", {"source": "builtin"}) == 1


def test_policy_read_live_from_the_translator() -> None:
    import dataclasses

    tr = make_translator()
    get = registry(collector(tr)).get_sample_value
    assert get("natedit_call_id_pool_size") == 65535
    tr.set_policy(dataclasses.replace(tr.policy, call_id_first=100, call_id_last=199,
                                      queue_inbound=1725))
    assert get("natedit_call_id_pool_size") == 100
    assert get("natedit_queue_bound", {"queue": "1725", "direction": "inbound"}) == 0


def test_build_info() -> None:
    get = registry(collector(None, current_policy=make_translator().policy.__class__)
                   ).get_sample_value
    assert get("natedit_build_info", {"version": "9.9", "python_version": re.sub(
        r"^(\d+\.\d+\.\d+).*", r"\1", __import__("platform").python_version())}) == 1


def test_without_the_core_only_worker_families() -> None:
    from natedit import Policy

    c = NateditCollector(None, Counter(), PolicyStatus(), dict, current_policy=Policy)
    names = {m.name for m in registry(c).collect()}
    assert "natedit_worker_errors" in names and "natedit_queue_bound" in names
    assert not names & {"natedit_call_info", "natedit_calls", "natedit_gre_packets"}
    assert c.calls_json() == []
    with pytest.raises(ValueError):
        NateditCollector(None, Counter(), PolicyStatus())


def test_process_metrics() -> None:
    reg = metrics.registry_for(collector(make_translator()))
    assert reg.get_sample_value("process_cpu_seconds_total") is not None
    assert reg.get_sample_value("process_resident_memory_bytes") is not None
    assert reg.get_sample_value("natedit_calls", {"state": "established"}) == 0


# -- known label values: the core's reason enums ---------------------------------------------


def _labels(reg: CollectorRegistry, family: str, label: str = "reason") -> dict[str, float]:
    return {s.labels[label]: s.value for m in reg.collect() if m.name == family
            for s in m.samples}


def test_release_reasons_are_the_core_enum() -> None:
    assert tuple(ReleaseReason) == metrics.RELEASE_REASONS
    fresh = registry(collector(make_translator()))
    assert _labels(fresh, "natedit_calls_released") == dict.fromkeys(ReleaseReason, 0)


def test_refusal_reasons_are_the_core_enum() -> None:
    assert tuple(Refusal) == metrics.REFUSAL_REASONS
    assert metrics.CONNECTION_REFUSAL_REASONS == ACL_REFUSALS
    fresh = registry(collector(make_translator()))
    assert _labels(fresh, "natedit_calls_refused") == dict.fromkeys(Refusal, 0)
    assert _labels(fresh, "natedit_connections_refused") == dict.fromkeys(ACL_REFUSALS, 0)


def test_verdict_reasons_are_the_core_enums() -> None:
    """Every drop and pass reason (the computed refused:<why> included) is exported at 0."""
    assert tuple(DropReason) == metrics.DROP_REASONS
    assert tuple(PassReason) == metrics.PASS_REASONS
    assert {r.drop for r in Refusal} <= set(metrics.DROP_REASONS)
    fresh = registry(collector(make_translator()))
    drops = _labels(fresh, "natedit_packets_dropped")
    passes = _labels(fresh, "natedit_packets_passed")
    assert drops == dict.fromkeys([*DropReason, *Malformed, "packet_error"], 0)
    assert passes == dict.fromkeys(PassReason, 0)


def test_malformed_reasons_are_the_core_enum() -> None:
    assert tuple(Malformed) == metrics.MALFORMED_REASONS
    fresh = registry(collector(make_translator()))
    samples = [(x.labels["reason"], x.labels["action"], x.value) for m in fresh.collect()
               if m.name == "natedit_malformed_packets" for x in m.samples]
    assert sorted(samples) == sorted((r, "drop", 0) for r in Malformed)


# -- a scrape while the loop changes the table -----------------------------------------------


def test_scrape_while_the_table_changes() -> None:
    """The loop maps and releases calls in a thread of its own while scrapes run: no
    scrape fails, and each sees a consistent number of series."""
    tr = make_translator()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        port = 30000
        try:
            while not stop.is_set():
                convs = []
                for i in range(50):
                    port = port + 1 if port < 60000 else 30000
                    conv = Conversation(tr, f"10.0.1.{i + 1}", client_port=port)
                    conv.open()
                    establish(conv, 5, i)
                    convs.append(conv)
                for conv in convs:
                    conv.send(OUT, b"", flags=TCP_ACK | 0x04)  # RST: release
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=churn)
    thread.start()
    reg = metrics.registry_for(collector(tr), process=False)
    c = collector(tr)
    seen = set()
    try:
        for _ in range(300):
            families = {m.name: m for m in reg.collect()}
            live = sum(s.value for s in families["natedit_calls"].samples)
            assert len(families["natedit_call_info"].samples) == live  # one snapshot
            seen.add(live)
            c.calls_json()
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert len(seen) > 1, seen  # the scrapes did run while the table changed


# -- the endpoint and natedit calls -----------------------------------------------------------


def test_http_metrics_and_calls(busy: tuple[Translator, list[int]],
                                capsys: pytest.CaptureFixture[str]) -> None:
    tr, publics = busy
    with metrics.MetricsServer("127.0.0.1:0", collector(tr)) as server:
        host, port = server.address
        base = f"http://{host}:{port}"
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'natedit_calls{state="established"} 2.0' in text
        assert "process_cpu_seconds_total" in text
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/nothing", timeout=5)
        assert err.value.code == 404
        calls = metrics.fetch_calls(f"{host}:{port}")
        assert sorted(c.public_call_id for c in calls) == sorted(publics[:2])
        assert {c.state for c in calls} == {"established"}
        assert metrics.fetch_calls(base + "/metrics") == calls  # any path: /calls is used
        assert cli.main(["calls", "--metrics", base]) == 0
    out, errtext = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["CLIENT", "CLIENT-ID", "SERVER", "SERVER-ID", "PUBLIC",
                                "PUBLIC-ID", "STATE"]
    assert len(lines) == 3 and all("established" in ln for ln in lines[1:])
    assert "natedit: 2 calls" in errtext


def test_calls_json_fields(busy: tuple[Translator, list[int]]) -> None:
    tr, publics = busy
    rows = collector(tr, clock=lambda: 11.0).calls_json()
    first = next(r for r in rows if r["public_call_id"] == publics[0])
    assert first["client_address"] == "10.0.0.5" and first["client_call_id"] == 0x1234
    assert first["server_address"] == SERVER and first["server_call_id"] == 100
    assert first["gre_packets"] == {"outbound": 1, "inbound": 1}
    assert first["idle_seconds"] == 10.0


def test_calls_without_a_worker(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["calls", "--metrics", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"natedit: error: no natedit worker answers at http://127.0.0.1:{port}/calls" in err


def test_listen_in_use() -> None:
    with metrics.MetricsServer("127.0.0.1:0", collector(make_translator())) as server:
        host, port = server.address
        with pytest.raises(NateditError, match="cannot serve metrics on"):
            metrics.MetricsServer(f"{host}:{port}", collector(make_translator())).start()


def test_calls_url() -> None:
    assert metrics.calls_url("127.0.0.1:9723") == "http://127.0.0.1:9723/calls"
    assert metrics.calls_url("http://[::1]:9723/metrics") == "http://[::1]:9723/calls"
    assert metrics.parse_listen("[::1]:9723") == ("::1", 9723)


@pytest.mark.parametrize("mode", list(WorkerDown))
def test_on_worker_down_gauge_follows_the_policy(mode: WorkerDown) -> None:
    policy = Policy(on_worker_down=mode)
    get = registry(collector(None, current_policy=lambda: policy)).get_sample_value
    for other in WorkerDown:
        assert get("natedit_on_worker_down", {"mode": other.value}) == (other is mode)


@dataclass
class Kernel:
    packets: list[int]
    calls: int


@pytest.mark.parametrize("datapath", list(Datapath))
def test_datapath_families(datapath: Datapath) -> None:
    """The datapath in force, and the kernel's own figures (0 without it)."""
    policy = Policy(datapath=datapath)
    figures = Kernel([7, 9], 2) if datapath is Datapath.KERNEL else None
    get = registry(collector(None, current_policy=lambda: policy,
                             kernel=lambda: figures)).get_sample_value
    for other in Datapath:
        assert get("natedit_datapath", {"datapath": other.value}) == (other is datapath)
    kernel = datapath is Datapath.KERNEL
    for direction, n in (("outbound", 7), ("inbound", 9)):
        assert get("natedit_kernel_gre_packets_total", {"direction": direction}) == (
            n if kernel else 0)
    assert get("natedit_kernel_calls") == (2 if kernel else 0)
