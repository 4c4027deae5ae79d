"""Scrapes and the packet path (issue 11, item 6): one ``json.dumps`` of the whole table
held the GIL, so the packet path, for 239 ms at 64,000 calls; now no piece encodes more
than CALLS_CHUNK calls, the interpreter is let go between two pieces (and every
SERIES_CHUNK natedit_call_info series, built as the exposition reads them), no garbage
collection runs during a scrape, and the metrics server shortens the switch interval.
The stall itself is measured by ``python -m bench.metrics --calls 65535`` (before and
now side by side): these tests hold the structure, never a time.
"""

from __future__ import annotations

import gc
import json
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from natedit import metrics
from natedit.core.translator import Translator
from natedit.metrics import NateditCollector
from natedit.status import PolicyStatus
from tests.pptp_flows import Conversation, establish, make_translator


def rows(n: int) -> list[dict[str, object]]:
    return [{"public_call_id": i, "client_address": "10.0.0.1", "state": "established"}
            for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, metrics.CALLS_CHUNK, metrics.CALLS_CHUNK + 1, 3000])
def test_the_body_is_the_same_json_in_pieces(n: int) -> None:
    calls = rows(n)
    chunks = [calls[i:i + metrics.CALLS_CHUNK] for i in range(0, n, metrics.CALLS_CHUNK)]
    pieces = list(metrics.calls_body(chunks))
    assert json.loads(b"".join(pieces)) == {"calls": calls}
    assert len(pieces) == 2 + -(-n // metrics.CALLS_CHUNK)
    one_call = max((len(json.dumps(c)) for c in calls), default=0) + 2  # and ", "
    assert max(len(p) for p in pieces) <= metrics.CALLS_CHUNK * one_call + 2


# -- scrapes let the packet loop in (issue 11, item 6, second step) ----------------------


def many_calls(n: int) -> Translator:
    tr = make_translator(max_calls_per_client=65535, max_control_connections=65535)
    for i in range(n):
        conv = Conversation(tr, f"10.0.{i >> 8}.{i & 0xFF or 1}", client_port=20000 + i)
        conv.open()
        establish(conv, 0x1234, i)
    return tr


def test_calls_body_lets_go_after_every_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    lets: list[int] = []
    monkeypatch.setattr(metrics, "let_go", lambda: lets.append(1))
    n = 5 * metrics.CALLS_CHUNK + 3
    chunks = [rows(n)[i:i + metrics.CALLS_CHUNK] for i in range(0, n, metrics.CALLS_CHUNK)]
    assert json.loads(b"".join(metrics.calls_body(chunks))) == {"calls": rows(n)}
    assert len(lets) == len(chunks) == 6


def test_call_series_are_built_as_read_letting_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """natedit_call_info's samples are made one at a time as the exposition reads them
    (never a list of 10,000 freed at once), the interpreter let go every SERIES_CHUNK;
    the exposition is the same text."""
    tr = many_calls(2 * metrics.SERIES_CHUNK + 5)
    collector = NateditCollector(tr, Counter(), PolicyStatus(), version="9.9")
    reg = CollectorRegistry()
    reg.register(collector)
    info = next(m for m in reg.collect() if m.name == "natedit_call_info")
    assert not isinstance(info.samples, list)
    lets: list[int] = []
    monkeypatch.setattr(metrics, "let_go", lambda: lets.append(1))
    samples = list(info.samples)
    assert len(samples) == len(tr.table) and len(lets) == 2
    assert {s.labels["public_call_id"] for s in samples} == {
        str(c.public_call_id) for c in tr.table.calls()}
    text = generate_latest(reg).decode()
    assert text.count("\nnatedit_call_info{") == len(tr.table)
    assert reg.get_sample_value("natedit_call_info", samples[0].labels) == 1


def test_no_garbage_collection_during_a_scrape() -> None:
    """gc is off while any scrape runs (/metrics, /calls, two at once), then as it was."""
    seen: list[bool] = []

    class Probe:
        def collect(self) -> Iterator[Metric]:
            seen.append(gc.isenabled())
            return iter([])

    reg = CollectorRegistry()
    reg.register(Probe())

    def calls() -> Iterator[list[dict[str, object]]]:
        seen.append(gc.isenabled())
        yield rows(3)
        seen.append(gc.isenabled())

    app = metrics.make_app(reg, calls)
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/calls"}
    assert gc.isenabled()
    body = iter(app(env, lambda *a: None))
    next(body)  # the first piece is out: the scrape is running
    assert not gc.isenabled()
    b"".join(app({**env, "PATH_INFO": "/metrics"}, lambda *a: None))  # a second one
    assert not gc.isenabled()  # the first still runs
    b"".join(body)
    assert gc.isenabled()
    assert seen == [False, False, False]
    gc.disable()  # one that finds it off leaves it off
    try:
        b"".join(app(env, lambda *a: None))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_metrics_server_shortens_the_switch_interval() -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # Python's default
    try:
        with metrics.MetricsServer("127.0.0.1:0", NateditCollector(
                make_translator(), Counter(), PolicyStatus(), version="9.9")):
            assert sys.getswitchinterval() <= metrics.SWITCH_INTERVAL
    finally:
        sys.setswitchinterval(old)
