"""The worker with real queues, in three namespaces of our own, around a stand-in translator.

client 10.0.0.2 --- 10.0.0.1 [gw] 198.51.100.1 --- 198.51.100.2 server

The gateway masquerades 10.0.0.0/24 (the operator's NAT, which natedit keeps);
``tests/worker_standin.py`` plays the translator: it rewrites GRE addresses
the way natedit does, so these tests check the netfilter placement itself:
TCP 1723 seen with the private client address both ways, inbound GRE
rewritten before routing, outbound GRE leaving with the public source, the
safety net, fail-closed without a worker, and an exact cleanup after SIGTERM,
after SIGKILL plus restart, and by ``natedit cleanup``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from natedit.core.wire import build_gre
from natedit.lab.netns import Port, Route, Topology, Veth
from tests.scratch_ns import Namespace, require_scratch_ns, scratch_namespaces

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "worker_standin.py"
PYTHON = sys.executable
POLICY = "public_address: 198.51.100.1\ninside_networks: [10.0.0.0/24]\n"

# Tiny peers, run with ``python -c`` inside a namespace.
TCP_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 1723)); s.listen(); print("listening", flush=True)
while True:
    c, (addr, port) = s.accept()
    with c:
        c.settimeout(5); c.sendall(c.recv(100) + b" from " + addr.encode())
"""
TCP_CLIENT = """
import socket, sys
try:
    c = socket.create_connection(("198.51.100.2", int(sys.argv[2])), timeout=float(sys.argv[1]))
    c.sendall(b"hello"); print(c.recv(100).decode())
except OSError as exc:
    print(f"failed: {exc}")
"""
GRE_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47); s.settimeout(float(sys.argv[1]))
print("listening", flush=True)
try:
    while True:
        data = s.recv(65535)
        if sys.argv[2].encode() in data:
            print(data.hex(), flush=True); break
except TimeoutError:
    print("timeout", flush=True)
"""
GRE_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 0))
"""


ROUTER = Topology(
    nodes=("client", "gw", "server"),
    links=(Veth(Port("gw", "in0", "10.0.0.1/24"), Port("client", "eth0", "10.0.0.2/24")),
           Veth(Port("gw", "out0", "198.51.100.1/24"), Port("server", "eth0", "198.51.100.2/24"))),
    routes=(Route("client", "default", "10.0.0.1"),),
    forwarding=("gw",),
)


@dataclass
class Lab:
    client: Namespace
    gw: Namespace
    server: Namespace
    tmp: Path
    baseline: str = ""
    """The gateway's iptables-save before natedit ever ran."""

    def start_worker(self, name: str) -> tuple[subprocess.Popen[bytes], Path]:
        policy = self.tmp / "policy.yaml"
        policy.write_text(POLICY)
        ready, log = self.tmp / f"{name}.ready", self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.gw.argv([PYTHON, str(STANDIN), str(policy), str(ready)]),
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise AssertionError(f"worker not ready:\n{log.read_text()}")
            time.sleep(0.02)
        return proc, log

    def tcp_exchange(self, timeout: float = 3.0, port: int = 1723) -> str:
        return self.client.run([PYTHON, "-c", TCP_CLIENT, str(timeout), str(port)]).strip()

    def gre(self, sender: Namespace, receiver: Namespace, packet: bytes, marker: str) -> bytes:
        """Send ``packet`` from ``sender``; what ``receiver`` got carrying ``marker`` (b"")."""
        recv = subprocess.Popen(
            receiver.argv([PYTHON, "-c", GRE_RECEIVER, "1.5", marker]),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert recv.stdout is not None
            assert recv.stdout.readline().strip() == "listening"
            sender.run([PYTHON, "-c", GRE_SENDER, packet.hex(), _dst(packet)])
            line = recv.stdout.readline().strip()
        finally:
            stop(recv)
        return b"" if line == "timeout" else bytes.fromhex(line)


def _dst(packet: bytes) -> str:
    return ".".join(str(b) for b in packet[16:20])


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Stop a process this test started (by its own pid only)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_scratch_ns()
    with scratch_namespaces(topology=ROUTER) as (client, gw, server):
        gw.sh("iptables -t nat -A POSTROUTING -s 10.0.0.0/24 -o out0 -j MASQUERADE")
        tcp_server = subprocess.Popen(
            server.argv([PYTHON, "-c", TCP_SERVER]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert tcp_server.stdout is not None
            assert tcp_server.stdout.readline().strip() == "listening"
            the_lab = Lab(client, gw, server, tmp_path)
            the_lab.baseline = gw.iptables_save()
            yield the_lab
        finally:
            stop(tcp_server)


def test_worker_end_to_end(lab: Lab) -> None:
    assert lab.tcp_exchange() == "hello from 198.51.100.1"  # the kernel's NAT alone
    worker, log = lab.start_worker("w")
    info = json.loads((lab.tmp / "w.ready").read_text())
    assert info["public_address"] == "198.51.100.1"
    assert info["pid"] == worker.pid

    # TCP 1723: queued both ways, seen with the private client address both ways,
    # and still masqueraded by the kernel.
    assert lab.tcp_exchange() == "hello from 198.51.100.1"

    # Outbound GRE leaves with the public source the worker wrote.
    got = lab.gre(
        lab.client, lab.server, build_gre("10.0.0.2", "198.51.100.2", 7, b"out-1"), "out-1"
    )
    assert got[12:20] == bytes([198, 51, 100, 1, 198, 51, 100, 2])

    # Inbound GRE to the public address is rewritten before routing, so it is
    # routed to the private client.
    got = lab.gre(
        lab.server, lab.client, build_gre("198.51.100.2", "198.51.100.1", 9, b"in-1"), "in-1"
    )
    assert got[12:20] == bytes([198, 51, 100, 2, 10, 0, 0, 2])

    # GRE the translator passes untouched never leaves with a private source.
    leak = build_gre("10.0.0.2", "198.51.100.2", 7, b"leak")
    assert lab.gre(lab.client, lab.server, leak, "leak") == b""

    # GRE no call of the table owns (server Call ID 5, not 7) is not claimed: never
    # queued (the stand-in would have written the source), it takes conntrack and the
    # operator's MASQUERADE, as without natedit.
    got = lab.gre(
        lab.client, lab.server, build_gre("10.0.0.2", "198.51.100.2", 5, b"not-ours"),
        "not-ours")
    assert got[12:20] == bytes([198, 51, 100, 1, 198, 51, 100, 2])
    # Its reply, from the call's server to the public address with a Call ID no call
    # has, is claimed (set own_peer: server . public address) and queued, so that the
    # gateway never answers it with ICMP protocol-unreachable (pptpd would end its calls);
    # the real translator drops it as no_call, the stand-in (blind to Call IDs) delivers it.
    got = lab.gre(lab.server, lab.client,
                  build_gre("198.51.100.2", "198.51.100.1", 6, b"back"), "back")
    assert got[12:20] == bytes([198, 51, 100, 2, 10, 0, 0, 2])

    # An exception drops that one packet; the worker goes on.
    boom = build_gre("10.0.0.2", "198.51.100.2", 7, b"raise")
    assert lab.gre(lab.client, lab.server, boom, "raise") == b""
    got = lab.gre(
        lab.client, lab.server, build_gre("10.0.0.2", "198.51.100.2", 7, b"out-2"), "out-2"
    )
    assert got[12:16] == bytes([198, 51, 100, 1])

    assert stop(worker) == 0
    text = log.read_text()
    assert "natedit: ready pid=" in text
    assert "standin: OUTBOUND proto=6 10.0.0.2->198.51.100.2" in text
    assert "standin: INBOUND proto=6 198.51.100.2->10.0.0.2" in text
    assert "standin: INBOUND proto=47 198.51.100.2->198.51.100.1" in text
    assert "natedit: event=call_released client_address=10.0.0.2" in text
    assert "natedit: error: packet_error: outbound packet dropped" in text
    assert "RuntimeError: stand-in told to fail" in text
    assert "natedit: SIGTERM received, stopping" in text
    assert "not-ours" not in text and "proto=47 10.0.0.2->198.51.100.2" in text
    assert text.count("proto=47") == 6  # out-1, in-1, back, leak, raise, out-2: the owned ones
    assert not (lab.tmp / "w.ready").exists()
    assert lab.gw.iptables_save() == lab.baseline
    assert "natedit" not in lab.gw.run(["nft", "list", "tables"])


def test_fail_closed_crash_restart_and_cleanup(lab: Lab) -> None:
    worker, _ = lab.start_worker("first")
    assert lab.tcp_exchange() == "hello from 198.51.100.1"
    stop(worker, signal.SIGKILL)  # a crash: the rules stay, nobody is bound

    # Fail closed: queued PPTP packets are dropped, nothing else is affected.
    assert lab.tcp_exchange(timeout=1.0).startswith("failed:")
    assert "Connection refused" in lab.tcp_exchange(port=80)

    worker, _ = lab.start_worker("second")  # replaces the crashed run's rules
    saved = lab.gw.iptables_save()
    assert saved.count("-A FORWARD -j NATEDIT-FORWARD") == 1
    assert lab.tcp_exchange() == "hello from 198.51.100.1"
    assert stop(worker) == 0
    assert lab.gw.iptables_save() == lab.baseline

    # natedit cleanup after a crash, without a restart.
    worker, _ = lab.start_worker("third")
    stop(worker, signal.SIGKILL)
    lab.gw.run([PYTHON, "-m", "natedit", "cleanup"])
    assert lab.gw.iptables_save() == lab.baseline
    assert lab.tcp_exchange() == "hello from 198.51.100.1"


def test_second_worker_on_the_same_queues_is_refused(lab: Lab) -> None:
    worker, _ = lab.start_worker("first")
    try:
        policy = lab.tmp / "policy.yaml"
        done = subprocess.run(
            lab.gw.argv([PYTHON, "-m", "natedit", "run", "--policy", str(policy),
                         "--state", "", "--pid-file", ""]),
            capture_output=True, text=True, timeout=30, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 1
        assert done.stderr.splitlines()[-1] == (
            "natedit: error: cannot bind NFQUEUE 1723 (Failed to create queue 1723.): "
            "is another natedit running?"
        )
        assert lab.tcp_exchange() == "hello from 198.51.100.1"  # the first one still works
    finally:
        assert stop(worker) == 0
    assert lab.gw.iptables_save() == lab.baseline
