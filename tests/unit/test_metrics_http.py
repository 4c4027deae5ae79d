"""The metrics HTTP server under clients that misbehave (issue 11, item 9).

It once gave every connection a thread of its own with no timeout (125 idle
connections held 125 threads and descriptors for the whole run), queued 5
connections in the kernel, and served ``POST /calls`` and ``//calls``. Now: at most
MAX_CLIENTS connections at once (the rest closed unanswered, counted), each let go
after IDLE_TIMEOUT without a request, a backlog of 64, GET and HEAD on the exact
paths only. Real sockets on loopback, a real server thread.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from natedit import metrics
from tests.pptp_flows import make_translator
from tests.unit.test_metrics import collector


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[metrics.MetricsServer]:
    monkeypatch.setattr(metrics._Server, "idle_timeout", 2.0)
    with metrics.MetricsServer("127.0.0.1:0", collector(make_translator())) as s:
        yield s


def request(server: metrics.MetricsServer, method: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for(predicate: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_only_get_and_head_on_the_exact_paths(server: metrics.MetricsServer) -> None:
    assert request(server, "GET", "/metrics")[0] == 200
    assert request(server, "GET", "/metrics?x=1")[0] == 200
    assert request(server, "HEAD", "/calls")[0] == 200
    status, body = request(server, "GET", "/calls")
    assert status == 200 and body.startswith(b'{"calls"')
    for method in ("POST", "PUT", "DELETE"):
        assert request(server, method, "/calls")[0] == 405
    assert request(server, "GET", "//calls")[0] == 404
    assert request(server, "GET", "//metrics")[0] == 404
    assert request(server, "GET", "/calls/")[0] == 404


def test_idle_connections_hold_no_more_than_the_bound(server: metrics.MetricsServer) -> None:
    threads_before = threading.active_count()
    idle = [socket.create_connection(server.address) for _ in range(125)]
    try:
        httpd = server._httpd
        assert httpd is not None
        # every connection past the bound is closed unanswered, at once
        assert wait_for(lambda: httpd.turned_away == 125 - metrics.MAX_CLIENTS, 5), (
            httpd.turned_away)
        assert threading.active_count() - threads_before <= metrics.MAX_CLIENTS
        # the idle ones are let go after the timeout, and the server answers again
        assert wait_for(lambda: threading.active_count() <= threads_before, 10)
        for s in idle:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the server, not left open
        assert request(server, "GET", "/metrics")[0] == 200
    finally:
        for s in idle:
            s.close()


def test_the_backlog_is_larger_than_socketserver_s() -> None:
    assert metrics._Server.request_queue_size == metrics.BACKLOG >= 64
