"""The tc-BPF program of the kernel datapath (natedit/kernel/gre.bpf.c), alone.

Built from source, loaded and attached by natedit.kernel.loader in a gateway
namespace between a client and a server namespace, its maps filled through the
ctypes bindings (natedit.kernel.libbpf) with one call. Then GRE goes through:
the call's own packets come out translated (address, Call ID, TTL - 1) and are
counted in the map values; a fragment, an unknown Call ID, a spoofed source and
an expired TTL are left to the stack (plain forwarding here, no rules: they
come out untranslated, or, TTL 1, not at all) and counted nowhere. Everything
is removed at the end: filters, clsact, pins. Forwarding semantics: the
egress is the routing table's when the packet comes (a replaced route moves the
next packet to another interface), GRE over the egress MTU is the stack's, and
tcpdump on the gateway sees what the program forwards (ingress and egress).
(The verdicts the worker's queues give what the program leaves to them:
tests/netns/test_e2e_not_owned.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from natedit.lab.netns import Netns, Port, Route, Topology, Veth
from tests.conftest import require, require_tool

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
INSIDE, OTHER, GW_IN, PUBLIC, SERVER = ("10.0.0.11", "10.0.0.12", "10.0.0.1", "198.51.100.1",
                                        "198.51.100.2")
CLIENT_CID, SERVER_CID, PUBLIC_CID = 0x1234, 0x0100, 0x4321
PUBLIC2, OTHER_CID = "198.51.100.3", 0x5678
"""A second public address: another call with the same server and public Call ID there."""

NET = Topology(
    nodes=("in", "gw", "out"),
    links=(Veth(Port("gw", "in0", f"{GW_IN}/24"), Port("in", "eth0", f"{INSIDE}/24")),
           Veth(Port("gw", "out0", f"{PUBLIC}/24"), Port("out", "eth0", f"{SERVER}/24"))),
    routes=(Route("in", "default", GW_IN), Route("out", "10.0.0.0/24", PUBLIC)),
    forwarding=("gw",),
)

AGENT = f"""
import json, sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from natedit.kernel import libbpf, loader
obj = loader.build(cache=Path(sys.argv[1]))
devs = loader.find_interfaces(IPv4Address("{PUBLIC}"), (IPv4Network("10.0.0.0/24"),), None)
att = loader.load(obj, IPv4Address("{PUBLIC}"), devs)
lib = libbpf.Libbpf()
maps = {{n: libbpf.Map(lib, att.map_path(n), k, v) for n, k, v in (
    ("natedit_in", libbpf.IN_KEY.size, libbpf.ROUTE.size),
    ("natedit_out", libbpf.OUT_KEY.size, libbpf.ROUTE.size))}}
pub, srv, cli = (IPv4Address(a).packed for a in ("{PUBLIC}", "{SERVER}", "{INSIDE}"))
pub2, other = IPv4Address("{PUBLIC2}").packed, IPv4Address("{OTHER}").packed
maps["natedit_in"].update(libbpf.pack_in_key(pub, srv, {PUBLIC_CID}),
                          libbpf.pack_route(cli, {CLIENT_CID}))
maps["natedit_in"].update(libbpf.pack_in_key(pub2, srv, {PUBLIC_CID}),
                          libbpf.pack_route(other, {OTHER_CID}))
maps["natedit_out"].update(libbpf.pack_out_key(cli, srv, {SERVER_CID}),
                           libbpf.pack_route(pub, {SERVER_CID}))
att.attach()
print(json.dumps({{"ready": devs, "prog": att.prog_id, "pins": str(att.pins)}}), flush=True)
sys.stdin.readline()
out = {{n: [libbpf.unpack_route(v)[2:] for _, v in maps[n].items()]
       for n in ("natedit_in", "natedit_out")}}
for m in maps.values():
    m.close()
out["trouble"] = att.remove()
print(json.dumps(out), flush=True)
"""

RECEIVER = """
import json, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
s.settimeout(1.5)
print("listening", flush=True)
got = []
try:
    while True:
        d = s.recv(4096)
        ihl = (d[0] & 15) * 4
        got.append({"src": socket.inet_ntoa(d[12:16]), "dst": socket.inet_ntoa(d[16:20]),
                    "ttl": d[8], "cid": struct.unpack_from("!H", d, ihl + 6)[0],
                    "tag": d[ihl + 14:ihl + 18].decode(errors="replace")})
except TimeoutError:
    pass
print(json.dumps(got), flush=True)
"""

SENDER = """
import socket, struct, sys
from natedit.core.wire import build_gre
src, dst, tag = sys.argv[1], sys.argv[2], sys.argv[6]
cid, ttl, frag = (int(a) for a in sys.argv[3:6])
pkt = bytearray(build_gre(src, dst, cid, b"\\xff\\x03" + tag.encode() + bytes(40), seq=1))
pkt[8] = ttl
struct.pack_into("!H", pkt, 6, frag)
struct.pack_into("!H", pkt, 10, 0)  # the kernel computes it (IP_HDRINCL)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(5):
    s.sendto(bytes(pkt), (dst, 0))
"""


def test_the_program_translates_its_calls_and_leaves_the_rest_to_the_stack(
        tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root for network namespaces and BPF")
    for tool in ("ip", "tc", "bpftool", "clang"):
        require_tool(tool)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with Netns(NET) as net:
        gw, ns_in, ns_out = net.name("gw"), net.name("in"), net.name("out")
        net.exec(ns_in, ["ip", "addr", "add", f"{OTHER}/24", "dev", "eth0"])
        net.exec(gw, ["ip", "addr", "add", f"{PUBLIC2}/24", "dev", "out0"])
        for ns, dev, peer in ((ns_in, "in0", INSIDE), (ns_in, "in0", OTHER),
                              (ns_out, "out0", SERVER)):
            # neighbours known (else the stack resolves them first: no_neigh, not ours)
            link = json.loads(net.exec(ns, ["ip", "-j", "link", "show", "eth0"]).stdout)
            net.exec(gw, ["ip", "neigh", "replace", peer, "lladdr", link[0]["address"],
                          "dev", dev])
        agent = subprocess.Popen(net.argv(gw, [sys.executable, "-c", AGENT, str(tmp_path)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        try:
            assert agent.stdout and agent.stdin and agent.stderr
            ready = json.loads(agent.stdout.readline() or "{}")
            assert sorted(ready.get("ready", [])) == ["in0", "out0"], agent.stderr.read()
            shown = net.exec(gw, ["tc", "filter", "show", "dev", "out0", "ingress"]).stdout
            assert f"id {ready['prog']} name natedit_gre" in shown and "direct-action" in shown

            def send(ns: str, src: str, dst: str, cid: int, tag: str, ttl: int = 64,
                     frag: int = 0) -> None:
                subprocess.run(net.argv(ns, [sys.executable, "-c", SENDER, src, dst, str(cid),
                                             str(ttl), str(frag), tag]),
                               env=env, cwd=str(REPO), check=True, timeout=10)

            def receive(ns: str, *sends: tuple[object, ...]) -> list[dict[str, object]]:
                rx = subprocess.Popen(net.argv(ns, [sys.executable, "-c", RECEIVER]),
                                      stdout=subprocess.PIPE, text=True)
                assert rx.stdout is not None
                assert rx.stdout.readline().strip() == "listening"
                for args in sends:
                    send(*args)  # type: ignore[arg-type]
                got: list[dict[str, object]] = json.loads(rx.stdout.readline())
                rx.wait(5)
                return got

            outside = receive(ns_out,
                              (ns_in, INSIDE, SERVER, SERVER_CID, "OWN1"),
                              (ns_in, INSIDE, SERVER, SERVER_CID, "FRAG", 64, 0x2000),
                              (ns_in, INSIDE, SERVER, SERVER_CID + 1, "UNKN"),
                              (ns_in, OTHER, SERVER, SERVER_CID, "SPOO"),
                              (ns_in, INSIDE, SERVER, SERVER_CID, "TTL1", 1))
            inside = receive(ns_in, (ns_out, SERVER, PUBLIC, PUBLIC_CID, "OWN2"),
                             (ns_out, SERVER, PUBLIC, PUBLIC_CID, "TTL1", 1),
                             (ns_out, SERVER, PUBLIC, PUBLIC_CID + 1, "UNKN"),
                             (ns_out, SERVER, PUBLIC2, PUBLIC_CID, "PUB2"))
            agent.stdin.write("done\n")
            agent.stdin.flush()
            final = json.loads(agent.stdout.readline() or "{}")
            agent.wait(10)
            after = net.exec(gw, ["tc", "qdisc", "show", "dev", "out0"]).stdout
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    by_tag: dict[str, list[dict[str, object]]] = {}
    for p in outside + inside:
        by_tag.setdefault(f"{p['tag']}@{p['dst']}", []).append(p)
    info = json.dumps(by_tag, indent=1)
    # the call's own GRE: translated by the program, TTL decremented
    assert by_tag[f"OWN1@{SERVER}"] == [{"src": PUBLIC, "dst": SERVER, "ttl": 63,
                                          "cid": SERVER_CID, "tag": "OWN1"}] * 5, info
    assert by_tag[f"OWN2@{INSIDE}"] == [{"src": SERVER, "dst": INSIDE, "ttl": 63,
                                          "cid": CLIENT_CID, "tag": "OWN2"}] * 5, info
    # the rest: the stack's (here plain forwarding: untranslated), never the program's
    assert {p["src"] for p in by_tag.get(f"FRAG@{SERVER}", [])} <= {INSIDE}, info
    assert {p["src"] for p in by_tag[f"UNKN@{SERVER}"]} == {INSIDE}, info
    assert {p["src"] for p in by_tag[f"SPOO@{SERVER}"]} == {OTHER}, info
    assert f"TTL1@{SERVER}" not in by_tag and f"TTL1@{INSIDE}" not in by_tag, info  # expired
    assert f"UNKN@{INSIDE}" not in by_tag, info  # to the gateway itself: not forwarded
    # counters: exactly the translated packets (IP length 20 + 8 + 4 + 2 + 4 + 40 = 78)
    # the same server and public Call ID on the second public address: the other call
    assert by_tag[f"PUB2@{OTHER}"] == [{"src": SERVER, "dst": OTHER, "ttl": 63,
                                         "cid": OTHER_CID, "tag": "PUB2"}] * 5, info
    assert final["natedit_in"] == [[5, 5 * 78]] * 2, final
    assert final["natedit_out"] == [[5, 5 * 78]], final
    assert final["trouble"] == [] and "clsact" not in after, (final, after)


def test_a_killed_worker_leaves_no_program_behind(tmp_path: Path) -> None:
    """SIGKILL: the guard removes the filters (and the clsact it added) at once."""
    require(os.geteuid() == 0, "needs root for network namespaces and BPF")
    for tool in ("ip", "tc", "bpftool", "clang"):
        require_tool(tool)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with Netns(NET) as net:
        gw = net.name("gw")
        agent = subprocess.Popen(net.argv(gw, [sys.executable, "-c", AGENT, str(tmp_path)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        try:
            assert agent.stdout and agent.stderr
            ready = json.loads(agent.stdout.readline() or "{}")
            assert "ready" in ready, agent.stderr.read()
            shown = {dev: net.exec(gw, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
                     for dev in ("in0", "out0")}
            agent.kill()
            agent.wait(5)
            deadline = time.monotonic() + 5
            while True:
                left = {dev: net.exec(gw, ["tc", "qdisc", "show", "dev", dev]).stdout
                        for dev in ("in0", "out0")}
                if not any("clsact" in q for q in left.values()) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert all("natedit_gre" in text for text in shown.values()), shown
    assert not any("clsact" in q for q in left.values()), left


# -- forwarding semantics: the routing table, the egress MTU, tcpdump -------------------

FAR = "203.0.113.5"
"""A server reached through a route: first via the ``alt`` namespace, then via ``out``
(both have the address)."""
ROUTED = NET + Topology(
    nodes=("alt",),
    links=(Veth(Port("gw", "alt0", "192.0.2.1/24"), Port("alt", "eth0", "192.0.2.2/24")),),
    routes=(Route("alt", "default", "192.0.2.1"), Route("gw", f"{FAR}/32", "192.0.2.2")),
)
FAR_CID = 0x0200

ROUTED_AGENT = AGENT.replace(
    'att.attach()\n',
    f'far = IPv4Address("{FAR}").packed\n'
    f'maps["natedit_out"].update(libbpf.pack_out_key(cli, far, {FAR_CID}),\n'
    f'                           libbpf.pack_route(pub, {FAR_CID}))\n'
    'att.attach()\n')

BIG_SENDER = SENDER.replace('bytes(40)', 'bytes(int(sys.argv[7]))').replace(
    'struct.pack_into("!H", pkt, 6, frag)', 'struct.pack_into("!H", pkt, 6, frag)  # no DF')


def test_forwarding_follows_the_routes_and_the_mtu_and_tcpdump_sees_it(
        tmp_path: Path) -> None:
    """The program's egress is the routing table's at the time of the packet (a route
    replaced moves the next packet); GRE larger than the egress interface's MTU is left
    to the stack (which fragments it, untranslated here: no rules); ``tcpdump`` on the
    gateway shows the packets the program forwards, as they came in (ingress of in0)
    and as they left (egress of out0)."""
    require(os.geteuid() == 0, "needs root for network namespaces and BPF")
    for tool in ("ip", "tc", "bpftool", "clang", "tcpdump"):
        require_tool(tool)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with Netns(ROUTED) as net:
        gw, ns_in, ns_out, ns_alt = (net.name(n) for n in ("gw", "in", "out", "alt"))
        for ns in (ns_out, ns_alt):
            net.exec(ns, ["ip", "addr", "add", f"{FAR}/32", "dev", "eth0"])
        for ns, dev, peer in ((ns_in, "in0", INSIDE), (ns_out, "out0", SERVER),
                              (ns_alt, "alt0", "192.0.2.2")):
            link = json.loads(net.exec(ns, ["ip", "-j", "link", "show", "eth0"]).stdout)
            net.exec(gw, ["ip", "neigh", "replace", peer, "lladdr", link[0]["address"],
                          "dev", dev])
        agent = subprocess.Popen(net.argv(gw, [sys.executable, "-c", ROUTED_AGENT,
                                               str(tmp_path)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        dumps: list[subprocess.Popen[str]] = []
        try:
            assert agent.stdout and agent.stdin and agent.stderr
            ready = json.loads(agent.stdout.readline() or "{}")
            assert "ready" in ready, agent.stderr.read()

            def send(ns: str, dst: str, cid: int, tag: str, size: int = 40) -> None:
                subprocess.run(net.argv(ns, [sys.executable, "-c", BIG_SENDER, INSIDE, dst,
                                             str(cid), "64", "0", tag, str(size)]),
                               env=env, cwd=str(REPO), check=True, timeout=10)

            def receive(sends: list[tuple[str, int, str, int]]) -> dict[str, list[Any]]:
                rxs = {ns: subprocess.Popen(net.argv(ns, [sys.executable, "-c", RECEIVER]),
                                            stdout=subprocess.PIPE, text=True)
                       for ns in (ns_out, ns_alt)}
                for rx in rxs.values():
                    assert rx.stdout is not None
                    assert rx.stdout.readline().strip() == "listening"
                for dst, cid, tag, size in sends:
                    send(ns_in, dst, cid, tag, size)
                got = {}
                for ns, rx in rxs.items():
                    assert rx.stdout is not None
                    got[ns] = json.loads(rx.stdout.readline())
                    rx.wait(5)
                return got

            # tcpdump on the gateway while the program forwards
            for dev, way in (("in0", "in"), ("out0", "out")):
                dump = subprocess.Popen(net.argv(gw, ["tcpdump", "-i", dev, "-Q", way, "-nn",
                                                      "-l", "-U", "ip proto 47"]),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                assert dump.stderr is not None
                while "listening on" not in (line := dump.stderr.readline()):
                    assert line, "tcpdump did not start"
                dumps.append(dump)
            first = receive([(FAR, FAR_CID, "ALT1", 40)])
            net.exec(gw, ["ip", "route", "replace", f"{FAR}/32", "via", SERVER, "dev", "out0"])
            second = receive([(FAR, FAR_CID, "OUT1", 40)])
            for dump in dumps:
                dump.send_signal(signal.SIGINT)
            seen = [dump.communicate(timeout=10)[0] for dump in dumps]
            net.exec(gw, ["ip", "link", "set", "out0", "mtu", "1000"])
            mtu = receive([(SERVER, SERVER_CID, "SMAL", 40), (SERVER, SERVER_CID, "BIGG", 1200)])
            agent.stdin.write("done\n")
            agent.stdin.flush()
            final = json.loads(agent.stdout.readline() or "{}")
            agent.wait(10)
        finally:
            for proc in [agent, *dumps]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    info = json.dumps({"first": first, "second": second, "mtu": mtu, "final": final,
                       "tcpdump": seen}, indent=1)

    def tags(got: dict[str, list[Any]], ns: str) -> list[tuple[str, str, str]]:
        return [(p["tag"], p["src"], p["dst"]) for p in got[ns]]

    # the route names alt: translated out of alt0; replaced by one via out0: out of out0
    assert tags(first, ns_alt) == [("ALT1", PUBLIC, FAR)] * 5 and not first[ns_out], info
    assert tags(second, ns_out) == [("OUT1", PUBLIC, FAR)] * 5 and not second[ns_alt], info
    # over the egress MTU (1000 < 1200): the stack's (fragmented, not translated here)
    assert tags(mtu, ns_out) == ([("SMAL", PUBLIC, SERVER)] * 5
                                 + [("BIGG", INSIDE, SERVER)] * 5), info
    # counted: 5 + 5 through the far element, 5 small ones through the server's
    assert sorted(final["natedit_out"]) == sorted([[10, 10 * 78], [5, 5 * 78]]), info
    # tcpdump on the gateway: the 5 OUT1 packets as they came in on in0 (the client's
    # source) and as the program sent them out of out0 (the public source)
    assert seen[0].count(f"{INSIDE} > {FAR}: GREv1") == 10, info  # ALT1 and OUT1 came in
    assert seen[1].count(f"{PUBLIC} > {FAR}: GREv1") == 5, info
    assert f"{INSIDE} > {FAR}" not in seen[1], info
