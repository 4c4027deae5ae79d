"""The policy with the real worker and real peers, in network namespaces of our own.

* Reloads under traffic: three pptp-linux calls flow through ``natedit run --policy``
  while a thread reloads valid and invalid policies (``natedit reload``); no frame of
  any call is lost, the live calls keep their public Call IDs, a new call after the
  reloads gets one from the new range, rejected reloads leave the policy as it was.
* Limits and ACLs with pptpd and pptp-linux: over ``max_calls_per_client`` a client's
  second call is refused the way the policy says (its Outgoing-Call-Request dropped,
  never seen by the server), a denied client gets no control connection, the other
  calls are not disturbed; once the first call ends, the refused request (retransmitted
  by the client's TCP) goes through.
* Why ``refuse`` has no ``reply``: conntrack calls a client ACK of bytes the server
  never sent INVALID, and such a packet leaves the gateway with its private address.
* The per-client rate limit: a client's second call at the same instant is delayed
  until its bucket refills (TCP retransmits the dropped request); another client is not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from natedit.lab.topology import Lab
from tests.harness import require_netns, scenarios
from tests.harness.capture import OCRQ
from tests.harness.scenarios import Gateway

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
FORCED = 0x1234


@pytest.fixture(autouse=True)
def _real_peers() -> None:
    require_netns()


def natedit_with_policy(name: str, policy: str) -> Gateway:
    """MASQUERADE plus ``natedit run --policy`` (file, ready file and pid file in the lab)."""

    def setup(lab: Lab) -> None:
        lab.gateway_masquerade_only()
        path = lab.tmpdir / "policy.yaml"
        path.write_text(policy)
        ready = lab.tmpdir / "natedit.ready"
        lab.start_gateway_process(
            [sys.executable, "-m", "natedit", "run", "--policy", str(path),
             "--ready-file", str(ready), "--pid-file", str(lab.tmpdir / "natedit.pid"),
             "--state", str(lab.tmpdir / "state.db")],
            ready=ready.exists, cwd=str(REPO), name=name)

    return Gateway(name, setup)


def natedit_reload(lab: Lab, *how: str) -> subprocess.CompletedProcess[str]:
    """``natedit reload`` run on the gateway, as an operator would."""
    return lab.exec(lab.gw_ns, [sys.executable, "-m", "natedit", "reload", *how],
                    check=False, timeout=30)


def worker_log(lab: Lab) -> str:
    return "\n".join(lab.process_log(p) for p in lab.gateway_processes)


def events(log: str, name: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
            for line in log.splitlines() if f"event={name} " in line]


def fetch_metrics(lab: Lab) -> str:
    """The worker's /metrics, read inside the gateway namespace."""
    code = ("import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:9723/metrics', timeout=5)"
            ".read().decode())")
    return lab.exec(lab.gw_ns, [sys.executable, "-c", code]).stdout


def sample(metrics: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" (\S+)"
    m = re.search(r"^" + pattern + "$", metrics, re.M)
    return float(m.group(1)) if m else None


# -- reloads under traffic -------------------------------------------------------------------

POLICY_A = """\
call_ids: {first: 1000, last: 1999}
limits: {max_calls_per_client: 8}
"""
POLICY_B = """\
# a narrower range elsewhere, a tighter limit than the live calls need, shorter timeouts
call_ids:
  first: 40000
  last: 40099
  allocation: sequential
limits:
  max_calls_per_client: 1
  new_calls_per_second: 5
timeouts: {request: 20, call_idle: 120}
"""
BAD_VALUE = "call_ids:\n  first: 40000\n  last: 4\n"
BAD_RESTART = "queues:\n  inbound: 1800\n"


def test_reloads_under_traffic_lose_no_call() -> None:
    """Valid and invalid reloads while three calls flow: every frame comes home."""
    gateway = natedit_with_policy("natedit-reload", POLICY_A)
    outcomes: list[tuple[str, int, str]] = []
    reloads_done: list[float] = []
    with scenarios.session(gateway, 4) as s:
        lab = s.lab
        keys = [0, 1, 2]
        for i in keys:
            s.start_call(i, forced_call_id=FORCED)
        connected = s.wait_connected(keys)
        before = s.phase("before", keys, 20)
        path, ready = lab.tmpdir / "policy.yaml", str(lab.tmpdir / "natedit.ready")

        def reloads() -> None:
            for text, name in [(POLICY_B, "valid"), (BAD_VALUE, "bad_value"),
                               (POLICY_A, "valid"), (BAD_RESTART, "bad_restart"),
                               (POLICY_B, "valid"), (BAD_VALUE, "bad_value")]:
                path.write_text(text)
                done = natedit_reload(lab, "--ready-file", ready)
                outcomes.append((name, done.returncode, done.stderr))
                time.sleep(0.1)
            reloads_done.append(time.monotonic())

        thread = threading.Thread(target=reloads)
        thread.start()
        during = s.phase("during_reloads", keys, 1500)
        during_end = time.monotonic()
        thread.join(60)
        after = s.phase("after", keys, 20)
        # the pid-file way: SIGHUP only, the outcome is in the log
        path.write_text(POLICY_B)
        sent = natedit_reload(lab, "--pid-file", str(lab.tmpdir / "natedit.pid"))
        s.start_call(3, forced_call_id=FORCED)
        new_connected = s.wait_connected([3])
        new_call = s.phase("new_call", [0, 1, 2, 3], 20)
        metrics = fetch_metrics(lab)
        log = worker_log(lab)
        r = s.finish("reloads_under_traffic", {})
    info = r.describe() + "\n" + "\n".join(map(str, outcomes))
    assert connected and before and during and after, info
    assert reloads_done and reloads_done[0] < during_end, info  # all under traffic
    assert new_connected and new_call, info
    assert all(c.clean for c in r.calls.values()), info  # no frame lost, none misdelivered
    assert r.total_foreign == 0 and r.gateway_alive, info
    # every reload got its outcome, with the problems printed for the rejected ones
    assert [(name, rc) for name, rc, _ in outcomes] == [
        ("valid", 0), ("bad_value", 1), ("valid", 0), ("bad_restart", 1), ("valid", 0),
        ("bad_value", 1)], info
    assert outcomes[1][2].splitlines()[0] == (
        f"{path}:3: call_ids.last: expected at least call_ids.first (40000), found 4 "
        "(an empty range)"), info
    assert outcomes[3][2].splitlines()[0] == (
        f"{path}:2: queues.inbound: expected 1724 as in the running policy (changing it "
        "needs a restart), found 1800"), info
    assert sent.returncode == 0, info
    assert len(re.findall(r"policy reloaded from ", log)) == 4, info
    assert len(re.findall(r"policy reload rejected, the running policy stays: ", log)) == 3
    assert f"policy reloaded from {path}: no change" in log, info  # B again, by SIGHUP
    assert sample(metrics, "natedit_policy_reloads_total", outcome="ok") == 4, info
    assert sample(metrics, "natedit_policy_reloads_total", outcome="failed") == 3, info
    # the live calls kept their public Call IDs from the first range; the new call got
    # the first ID of the range in force (B, sequential)
    ocrq_ids = [m.call_id for m in r.wire.messages(OCRQ) if m.call_id is not None]
    assert len(ocrq_ids) == 4, info
    assert all(1000 <= cid <= 1999 for cid in ocrq_ids[:3]) and ocrq_ids[3] == 40000, info
    assert set(ocrq_ids) <= r.wire.gre_call_ids_from_server, info
    mapped = events(log, "call_mapped")
    assert sorted(int(e["public_call_id"], 0) for e in mapped) == sorted(ocrq_ids), info
    assert not events(log, "call_released") or all(
        e["reason"] in ("fin", "stop", "reset", "disconnect")
        for e in events(log, "call_released")), info


# -- hostile policy files on reload (issue 11, item 4) --------------------------------------

HOSTILE = [
    ("deep", "x: " + "[" * 5000 + "\n", ":1: not valid YAML: nested deeper than 16 levels"),
    ("digits", "limits: {max_calls: " + "9" * 5000 + "}\n",
     ":1: limits.max_calls: expected an integer from 1 to 65535, found a number of 5000 "
     "characters"),
    ("burst", "limits: {new_calls_burst: " + "9" * 400 + "}\n",
     ":1: limits.new_calls_burst: expected an integer from 1 to 65535, found a number of "
     "400 characters"),
    ("fifo", None, ": cannot read: a FIFO, not a regular file"),
]


def test_hostile_reloads_leave_the_worker_running() -> None:
    """A 5,000-[ policy (it once killed the worker: RecursionError, rules gone), a
    5,000-digit and a 400-digit integer, a FIFO (it once blocked the reload for good):
    each reload is rejected in well under its wait, the call flows on, and the next
    valid reload still works."""
    gateway = natedit_with_policy("natedit-hostile", POLICY_A)
    outcomes: list[tuple[str, int, str, float]] = []
    with scenarios.session(gateway, 1) as s:
        lab = s.lab
        s.start_call(0, forced_call_id=FORCED)
        connected = s.wait_connected([0])
        before = s.phase("before", [0], 20)
        path, ready = lab.tmpdir / "policy.yaml", str(lab.tmpdir / "natedit.ready")
        for name, text, _ in HOSTILE:
            path.unlink()
            if text is None:
                os.mkfifo(path)
            else:
                path.write_text(text)
            start = time.monotonic()
            done = natedit_reload(lab, "--ready-file", ready, "--wait", "20")
            outcomes.append((name, done.returncode, done.stderr, time.monotonic() - start))
            between = s.phase(f"after_{name}", [0], 20)
            assert between, f"{name}: the call stopped"
        path.unlink()
        path.write_text(POLICY_B)
        valid = natedit_reload(lab, "--ready-file", ready)
        after = s.phase("after", [0], 20)
        metrics = fetch_metrics(lab)
        log = worker_log(lab)
        r = s.finish("hostile_reloads", {})
    info = r.describe() + "\n" + "\n".join(map(str, outcomes))
    assert connected and before and after, info
    assert all(c.clean for c in r.calls.values()) and r.gateway_alive, info
    for (name, rc, err, took), (_, _, problem) in zip(outcomes, HOSTILE, strict=True):
        assert rc == 1, info
        assert err.splitlines() == [f"{path}{problem}", "natedit: reload rejected by natedit "
                                    f"(pid {err.split('(pid ')[1].split(')')[0]}); the "
                                    "running policy stays"], info
        assert took < 15, (name, info)  # answered, not waited out
    assert valid.returncode == 0, info
    assert sample(metrics, "natedit_policy_reloads_total", outcome="failed") == 4, info
    assert sample(metrics, "natedit_policy_reloads_total", outcome="ok") == 1, info
    assert "Traceback" not in log, info
    assert len(re.findall(r"policy reload rejected, the running policy stays: ", log)) == 4


# -- limits and ACLs with real peers ---------------------------------------------------------

LIMITS = """\
limits:
  max_calls_per_client: 1
acl:
  clients:
    deny: [10.0.0.13/32]
"""


def test_limits_and_acl_with_real_peers() -> None:
    """c1 (10.0.0.11) may hold one call: its second call's request is dropped, never
    reaches pptpd, and goes through when c1's first call has ended. c2 is not affected.
    c3 (10.0.0.13) is denied: its control connection never leaves the gateway."""
    gateway = natedit_with_policy("natedit-limits", LIMITS)
    with scenarios.session(gateway, 3) as s:
        lab = s.lab
        s.start_call(0, forced_call_id=FORCED, key=0)
        s.start_call(1, forced_call_id=FORCED, key=1)
        first_connected = s.wait_connected([0, 1])
        before = s.phase("before", [0, 1], 20)
        # Own /run: a second control connection. Another Call ID: both pptp processes of
        # c1 read every GRE packet to 10.0.0.11 and pick theirs by Call ID.
        s.start_call(0, forced_call_id=FORCED + 1, key=10)
        s.start_call(2, forced_call_id=FORCED, key=2)   # the denied client
        refused_connected = s.wait_connected([10, 2], timeout=4.0)
        during = s.phase("during_refusals", [0, 1], 40)
        servers_calls_while_refused = len(s.pptpd.calls())
        metrics = fetch_metrics(lab)
        log_while_refused = worker_log(lab)
        # c1's first call ends: the next retransmission of the refused request goes through
        s.calls[0].kill()
        late_connected = s.wait_connected([10], timeout=15.0)
        late = s.phase("late_call", [1, 10], 20)
        r = s.finish("limits_and_acl", {})
    info = r.describe()
    assert first_connected and before, info
    assert not refused_connected, info
    assert not r.calls[2].connected and not r.calls[2].phases, info
    assert during and r.calls[1].clean, info  # the others are not affected
    assert servers_calls_while_refused == 2, info  # pptpd never saw the refused call
    refused = events(log_while_refused, "call_refused")
    assert [(e["client_address"], e["reason"]) for e in refused] == [
        ("10.0.0.11", "client_limit")], info  # once, not per retransmission
    denied = events(log_while_refused, "connection_refused")
    assert denied and {(e["client_address"], e["reason"]) for e in denied} == {
        ("10.0.0.13", "client_denied")}, info
    assert sample(metrics, "natedit_calls_refused_total", reason="client_limit") == 1, info
    assert late_connected and late and r.calls[10].clean, info
    # on the public side: c1's two control connections and c2's, none of c3; three
    # Outgoing-Call-Requests (c1's second only once it was allowed)
    assert len(r.wire.control_connections) == 3, info
    assert len(r.wire.messages(OCRQ)) == 3, info
    assert r.total_foreign == 0 and r.gateway_alive, info


RATE = """\
limits:
  new_calls_per_second: 0.5
  new_calls_burst: 1
"""


def test_rate_limit_delays_a_clients_second_call() -> None:
    """One new call per two seconds per client: c1 starts two calls at once; one gets
    through, the other's request is dropped and goes through on a TCP retransmission
    once the bucket has refilled. c2, starting at the same time, is not delayed."""
    gateway = natedit_with_policy("natedit-rate", RATE)
    with scenarios.session(gateway, 2) as s:
        st = s.pump.stats
        t0 = time.monotonic()
        s.start_call(0, forced_call_id=FORCED, key=0)
        s.start_call(0, forced_call_id=FORCED + 1, key=10)
        s.start_call(1, forced_call_id=FORCED, key=1)
        s.pump.wait_until(lambda: bool(st[1].hellos) and bool(st[0].hellos or st[10].hellos),
                          6.0)
        early = sorted(k for k in (0, 1, 10) if st[k].hellos)
        t_early = time.monotonic() - t0
        both = s.wait_connected([0, 10], timeout=12.0)
        t_late = time.monotonic() - t0
        flowing = s.phase("all", [0, 1, 10], 20)
        log = worker_log(s.lab)
        r = s.finish("rate_limit", {"early": early, "t_early": t_early, "t_late": t_late})
    info = r.describe()
    assert len(early) == 2 and 1 in early, info  # c2 and one of c1's calls, at once
    assert both and flowing and all(c.clean for c in r.calls.values()), info
    assert t_late - t_early >= 1.0, info  # the bucket refills in 2 s
    refused = events(log, "call_refused")
    assert [(e["client_address"], e["reason"]) for e in refused] == [
        ("10.0.0.11", "rate_limited")], info
    assert len(r.wire.messages(OCRQ)) == 3, info  # the dropped request left once, later


# -- why refuse has no "reply" ---------------------------------------------------------------

_TCP_SERVER = r"""
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 1723)); s.listen(); print("listening", flush=True)
c, _ = s.accept(); c.sendall(b"x" * 10); time.sleep(10)
"""
# Connects, reads the server's 10 bytes, learns both sequence numbers from a raw copy of
# the server's segment, then sends three bare ACKs (40 bytes) acknowledging 10 + extra.
_ACK_BEYOND = r"""
import socket, struct, sys
extra = int(sys.argv[1])
sniff = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
c = socket.create_connection(("198.51.100.2", 1723), timeout=5)
c.recv(10)
while True:
    pkt = sniff.recv(2000)
    ihl = (pkt[0] & 15) * 4
    sport, dport, seq, ack = struct.unpack_from("!HHII", pkt, ihl)
    if sport == 1723 and len(pkt) - ihl - (pkt[ihl + 12] >> 4) * 4 == 10:
        break
me, server = pkt[16:20], pkt[12:16]
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
tcp = struct.pack("!HHIIBBHHH", dport, 1723, ack, seq + 10 + extra, 0x50, 0x10, 65535, 0, 0)
tcp = (tcp[:16] + struct.pack("!H", csum(me + server + struct.pack("!BBH", 0, 6, 20) + tcp))
       + tcp[18:])
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, me, server)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    raw.sendto(ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + tcp, ("198.51.100.2", 0))
"""


def _rule_packets(lab: Lab, ns: str, table: str, comment: str) -> int:
    listing = lab.exec(ns, ["iptables", "-t", table, "-L", "-v", "-n", "-x"]).stdout
    return sum(int(ln.split()[0]) for ln in listing.splitlines() if f"/* {comment} */" in ln)


@pytest.mark.parametrize("extra", [0, 32], ids=["exact_ack", "ack_32_beyond"])
def test_why_refuse_has_no_reply(extra: int) -> None:
    """The fact behind the README's "why there is no refuse: reply": a client that got
    an injected 32-byte Outgoing-Call-Reply acknowledges 32 bytes the server never sent.
    natedit edits TCP 1723 after conntrack has judged it (mangle FORWARD), so conntrack
    sees that ACK unshifted: it calls it INVALID, and the packet is not masqueraded, it
    reaches the server with the client's private address. An exact ACK is ESTABLISHED
    and masqueraded."""
    with Lab(1) as lab:
        lab.gateway_masquerade_only()
        for state in ("ESTABLISHED", "INVALID"):
            lab.iptables("-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "--dport", "1723",
                         "-m", "length", "--length", "40", "-m", "conntrack", "--ctstate",
                         state, "-m", "comment", "--comment", f"bare-ack-{state}")
        for source in ("10.0.0.0/8", lab.gw_public_addr):
            lab.exec(lab.server_ns, [
                "iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "1723",
                "-m", "length", "--length", "40", "-s", source,
                "-m", "comment", "--comment", f"bare-ack-from-{source}"])
        server = lab.popen(lab.server_ns, [sys.executable, "-c", _TCP_SERVER],
                           stdout=subprocess.PIPE, name="tcp-server")
        assert server.stdout is not None and server.stdout.readline() == b"listening\n"
        lab.exec(lab.clients[0].ns, [sys.executable, "-c", _ACK_BEYOND, str(extra)])
        time.sleep(0.2)
        seen = {name: _rule_packets(lab, ns, table, name) for ns, table, name in [
            (lab.gw_ns, "mangle", "bare-ack-ESTABLISHED"),
            (lab.gw_ns, "mangle", "bare-ack-INVALID"),
            (lab.server_ns, "raw", "bare-ack-from-10.0.0.0/8"),
            (lab.server_ns, "raw", f"bare-ack-from-{lab.gw_public_addr}")]}
    if extra == 0:
        assert seen == {"bare-ack-ESTABLISHED": 3, "bare-ack-INVALID": 0,
                        "bare-ack-from-10.0.0.0/8": 0,
                        f"bare-ack-from-{lab.gw_public_addr}": 3}
    else:
        assert seen == {"bare-ack-ESTABLISHED": 0, "bare-ack-INVALID": 3,
                        "bare-ack-from-10.0.0.0/8": 3,
                        f"bare-ack-from-{lab.gw_public_addr}": 0}
