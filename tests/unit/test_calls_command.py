"""``natedit calls``: conntrack-style filters, --json, Call IDs in hex, and --watch
(the table, then the live events), against a real metrics endpoint and event socket."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from natedit import cli, metrics
from natedit.core.events import CallMapped
from natedit.eventstream import EventHub, EventServer
from natedit.metrics import NateditCollector
from natedit.status import PolicyStatus
from tests.pptp_flows import PUBLIC, SERVER
from tests.unit.test_eventstream import call, unique_name, wait_for
from tests.unit.test_metrics import busy_translator


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A metrics endpoint over the busy table: 10.0.0.5 has two established calls."""
    tr, _ = busy_translator()
    collector = NateditCollector(tr, {}, PolicyStatus(loaded_at=0.0))
    with metrics.MetricsServer("127.0.0.1:0", collector) as server:
        host, port = server.address
        yield f"{host}:{port}"


def calls(endpoint: str, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert cli.main(["calls", "--metrics", endpoint, *args]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err.strip().endswith(" calls")
    return lines


def test_filters(endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    table = calls(endpoint, capsys)
    assert len(table) == 3  # header, two live calls
    assert calls(endpoint, capsys, "--client", "10.0.0.5") == table
    assert calls(endpoint, capsys, "--server", SERVER, "--public", PUBLIC,
                 "--state", "established") == table
    for none in (("--client", "10.0.0.6"), ("--state", "requested"),  # its call ended
                 ("--public", "203.0.113.9")):
        (header,) = calls(endpoint, capsys, *none)
        assert header.split() == table[0].split()


def test_call_ids_in_hex(endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [line.split() for line in calls(endpoint, capsys)[1:]]
    assert {r[1] for r in rows} == {"0x1234"}
    assert sorted(r[3] for r in rows) == ["0x0064", "0x0065"]  # server Call IDs 100, 101
    assert all(r[5].startswith("0x") and len(r[5]) == 6 for r in rows)


def test_json(endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [json.loads(line) for line in calls(endpoint, capsys, "--json", "--client",
                                               "10.0.0.5")]
    assert len(rows) == 2
    assert {r["client_call_id"] for r in rows} == {0x1234}  # integers, as /calls has them
    assert {r["server_call_id"] for r in rows} == {100, 101}
    assert all(r["state"] == "established" and "gre_packets" in r for r in rows)


def test_bad_filter_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["calls", "--client", "nobody"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["calls", "--state", "sleeping"])
    assert "invalid choice" in capsys.readouterr().err


def test_watch_prints_the_table_then_the_events(endpoint: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--watch: the (filtered) table, then the events that pass the same filters, until
    the worker closes the stream (exit 1)."""
    name, hub = unique_name(), EventHub()
    server = EventServer(name, hub).start()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(cli.main(
        ["calls", "--metrics", endpoint, "--watch", "--events-socket", name,
         "--client", "10.0.0.5"])), daemon=True)
    seen = ""

    def printed(text: str) -> bool:
        nonlocal seen
        seen += capsys.readouterr().out
        return text in seen

    thread.start()
    try:
        wait_for(lambda: len(hub.subscribers) == 1)
        other = dataclasses.replace(call(1), client_address=IPv4Address("10.0.0.9"))
        hub.publish([CallMapped(other), CallMapped(
            dataclasses.replace(call(2), client_address=IPv4Address("10.0.0.5")))])
        wait_for(lambda: printed("event=call_mapped"))
    finally:
        server.stop()
    thread.join(10)
    assert result == [1]  # the worker closed the stream
    lines = seen.splitlines()
    assert lines[0].split()[0] == "CLIENT" and len(lines) == 4, seen  # 2 calls, 1 event
    assert "client_address=10.0.0.5 client_call_id=0x1234" in lines[3]
    assert "10.0.0.9" not in seen
