"""GRE the kernel datapath does not own gets the verdict it gets in userspace.

Real peers (pptpd, pptp-linux) in the namespace lab; two calls are established,
then crafted GRE is sent from the first call's client and from the server
(raw sockets, no GRE sequence number, so the peers take it for an
acknowledgement and their calls are not disturbed):

* a fragment: one packet of the call cut into two IP fragments, inbound and outbound;
* IP options: a packet of the call with a 24-byte IP header, inbound and outbound;
* an unknown Call ID, outbound and inbound (from an outside address with no call,
  and from the call's server);
* a spoofed source: an inside address with no call, the call's server Call ID;
* an expired TTL (1), outbound and inbound.

The tc-BPF program leaves every one of them to the stack and the queue rules,
so with ``datapath: kernel`` each gets exactly what it gets with
``datapath: userspace`` (the reference, :data:`EXPECTED`): the fragments are
reassembled by the gateway and the packet translated by the queue, so is the packet
with IP options (the worker's full path, options kept); natedit's rules claim
only GRE the ownership sets name (natedit/owned.py): the unknown Call IDs are
no call's and take the path they would take without natedit (outbound
MASQUERADEd to the server; inbound from an outside address with no call, left
to the gateway itself, never reaching a client), except inbound from the call's
server (set own_peer: server . public address): claimed and dropped as
``no_call``, so that the gateway never answers it with ICMP protocol-unreachable
(the server's receiver watches for one: pptpd would end its calls), and the
calls still pass frames afterwards; the spoofed one names a call's server Call
ID (set own_server): it is claimed and dropped as ``no_call`` too (counted in
natedit_packets_dropped); an
expired TTL is answered with ICMP time-exceeded (the inbound one after the queue
translated it, as the kernel forwards it) and delivered nowhere. With the
kernel datapath, the queues saw each of them, and the call's own GRE still went
through the program while they were sent.

(The lab's inside interface is a bridge, and bridge netfilter (br_netfilter,
bridge-nf-call-iptables) runs the IP PREROUTING hooks, defragmentation
included, on bridged frames before the bridge device's own tc ingress: there the
program meets the outbound fragments already reassembled, a whole packet of the
call, and translates it itself. Same verdict; the inbound fragments, from the
outside veth, are the ones that show the queue taking them.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from natedit.lab.topology import PUBLIC_GW_ADDR, SERVER_ADDR, Lab
from natedit.metrics import parse_queue_stats
from tests.harness import require_netns, scenarios
from tests.harness.kernel import kernel_maps
from tests.harness.scenarios import Gateway, natedit_gateway

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
FORCED = 0x1234
N = 3
"""Packets sent per case."""
SPOOFED = "10.0.0.200"
"""An inside address no client has."""

RECEIVER = """
import json, select, socket, struct, sys, time
gre = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
print("listening", flush=True)
got, end = [], None
def tag(d, at):
    t = d[at:at + 4]
    return t.decode() if t.isalpha() and t.isupper() else None
while end is None or time.monotonic() < end:
    ready, _, _ = select.select([gre, icmp, sys.stdin], [], [], 0.05)
    for s in ready:
        if s is sys.stdin:
            sys.stdin.readline()
            end = time.monotonic() + 0.7
            continue
        d = s.recv(65535)
        ihl = (d[0] & 15) * 4
        if s is gre:
            t = tag(d, ihl + 8)
            if t:
                got.append({"kind": "gre", "tag": t, "src": socket.inet_ntoa(d[12:16]),
                            "dst": socket.inet_ntoa(d[16:20]), "ttl": d[8],
                            "cid": struct.unpack_from("!H", d, ihl + 6)[0]})
        elif d[ihl] == 11:  # time exceeded: the offending header follows
            inner = d[ihl + 8:]
            t = tag(inner, (inner[0] & 15) * 4 + 8)
            if t:
                got.append({"kind": "time_exceeded", "tag": t,
                            "src": socket.inet_ntoa(d[12:16]),
                            "inner_dst": socket.inet_ntoa(inner[16:20])})
        elif d[ihl] == 3 and d[ihl + 1] == 2:  # protocol unreachable: the header follows
            inner = d[ihl + 8:]
            t = tag(inner, (inner[0] & 15) * 4 + 8)
            if t:
                got.append({"kind": "unreachable", "tag": t,
                            "src": socket.inet_ntoa(d[12:16])})
print(json.dumps(got), flush=True)
"""

SENDER = """
import json, socket, struct, sys
from natedit.core.wire import build_gre
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for case in json.loads(sys.argv[1]):
    for i in range(case["n"]):
        pkt = bytearray(build_gre(case["src"], case["dst"], case["cid"],
                                  case["tag"].encode() + bytes(96), seq=None,
                                  ip_options=b"\\x01\\x01\\x01\\x00" if case.get("opts") else b""))
        pkt[8] = case["ttl"]
        struct.pack_into("!H", pkt, 4, 0x4000 + i + 16 * len(case["tag"]))  # an IP ID
        if case["frag"]:  # two fragments: 16 bytes of GRE, then the rest
            head, body = pkt[:20], pkt[20:]
            for off, part, more in ((0, body[:16], 0x2000), (2, body[16:], 0)):
                f = bytearray(head) + part
                struct.pack_into("!HHH", f, 2, len(f), 0, more | off)
                struct.pack_into("!H", f, 4, 0x4000 + i)
                s.sendto(bytes(f), (case["dst"], 0))
        else:
            s.sendto(bytes(pkt), (case["dst"], 0))
"""

EXPECTED: dict[str, dict[str, Any]] = {
    # what userspace does (and so what the kernel datapath must do), per case
    "FRGO": {"at_server": [{"src": PUBLIC_GW_ADDR, "cid": "server"}] * N, "at_client": [],
             "time_exceeded": [], "unreachable": []},
    "FRGI": {"at_server": [], "at_client": [{"src": SERVER_ADDR, "cid": FORCED}] * N,
             "time_exceeded": [], "unreachable": []},
    "OPTO": {"at_server": [{"src": PUBLIC_GW_ADDR, "cid": "server"}] * N, "at_client": [],
             "time_exceeded": [], "unreachable": []},
    "OPTI": {"at_server": [], "at_client": [{"src": SERVER_ADDR, "cid": FORCED}] * N,
             "time_exceeded": [], "unreachable": []},
    "UNKO": {"at_server": [{"src": PUBLIC_GW_ADDR, "cid": "unknown"}] * N, "at_client": [],
             "time_exceeded": [], "unreachable": []},  # not natedit's: MASQUERADE
    "UNKI": {"at_server": [], "at_client": [], "time_exceeded": [], "unreachable": []},
    # from the call's server, a Call ID no call has (own_peer): no_call, no ICMP back
    "UNKS": {"at_server": [], "at_client": [], "time_exceeded": [], "unreachable": []},
    "SPOO": {"at_server": [], "at_client": [], "time_exceeded": [], "unreachable": []},
    "TTLO": {"at_server": [], "at_client": [],
             "time_exceeded": [{"at": "client", "inner_dst": SERVER_ADDR}],
             "unreachable": []},
    "TTLI": {"at_server": [], "at_client": [],
             "time_exceeded": [{"at": "server", "inner_dst": "client"}],
             "unreachable": []},
}
NO_CALL = 2 * N
"""natedit_packets_dropped{reason="no_call"}: SPOO and UNKS (UNKO and UNKI are not
natedit's)."""
STRANGER = "198.51.100.77"
"""An outside address with no call (UNKI's source: not natedit's, left to the gateway)."""


def gateway(datapath: str) -> Gateway:
    return natedit_gateway(f"natedit-{datapath}", f"datapath: {datapath}\n")


def http(lab: Lab, path: str) -> str:
    code = ("import urllib.request; print(urllib.request.urlopen("
            f"'http://127.0.0.1:9723{path}', timeout=5).read().decode())")
    return lab.exec(lab.gw_ns, [sys.executable, "-c", code]).stdout


def dropped(lab: Lab) -> dict[str, float]:
    out = {}
    for ln in http(lab, "/metrics").splitlines():
        if ln.startswith("natedit_packets_dropped_total{"):
            out[ln.split('reason="', 1)[1].split('"', 1)[0]] = float(ln.rsplit(" ", 1)[1])
    return out


def queued(lab: Lab) -> dict[int, int]:
    """Packets queued so far, by queue number."""
    text = lab.exec(lab.gw_ns, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return {n: q.id_sequence for n, q in parse_queue_stats(text).items()}


@pytest.mark.parametrize("datapath", ["userspace", "kernel"])
def test_gre_the_kernel_does_not_own_gets_todays_verdict(datapath: str) -> None:
    require_netns()
    with scenarios.session(gateway(datapath), 2) as s:
        lab = s.lab
        for i in (0, 1):
            s.start_call(i, forced_call_id=FORCED)
        assert s.wait_connected([0, 1])
        assert s.phase("warm", [0, 1], 5)
        client = lab.clients[0]
        calls = json.loads(http(lab, "/calls"))["calls"]
        [call] = [c for c in calls if c["client_address"] == client.addr]
        server_cid, public_cid = call["server_call_id"], call["public_call_id"]
        unknown_out = max(c["server_call_id"] for c in calls) + 7
        unknown_in = max(c["public_call_id"] for c in calls) + 7
        out_cases = [
            {"tag": "FRGO", "src": client.addr, "dst": SERVER_ADDR, "cid": server_cid,
             "ttl": 64, "frag": True},
            {"tag": "OPTO", "src": client.addr, "dst": SERVER_ADDR, "cid": server_cid,
             "ttl": 64, "frag": False, "opts": True},
            {"tag": "UNKO", "src": client.addr, "dst": SERVER_ADDR, "cid": unknown_out,
             "ttl": 64, "frag": False},
            {"tag": "SPOO", "src": SPOOFED, "dst": SERVER_ADDR, "cid": server_cid,
             "ttl": 64, "frag": False},
            {"tag": "TTLO", "src": client.addr, "dst": SERVER_ADDR, "cid": server_cid,
             "ttl": 1, "frag": False},
        ]
        in_cases = [
            {"tag": "FRGI", "src": SERVER_ADDR, "dst": PUBLIC_GW_ADDR, "cid": public_cid,
             "ttl": 64, "frag": True},
            {"tag": "OPTI", "src": SERVER_ADDR, "dst": PUBLIC_GW_ADDR, "cid": public_cid,
             "ttl": 64, "frag": False, "opts": True},
            {"tag": "UNKI", "src": STRANGER, "dst": PUBLIC_GW_ADDR, "cid": unknown_in,
             "ttl": 64, "frag": False},
            {"tag": "UNKS", "src": SERVER_ADDR, "dst": PUBLIC_GW_ADDR, "cid": unknown_in,
             "ttl": 64, "frag": False},
            {"tag": "TTLI", "src": SERVER_ADDR, "dst": PUBLIC_GW_ADDR, "cid": public_cid,
             "ttl": 1, "frag": False},
        ]
        receivers = {
            where: subprocess.Popen(lab.net.argv(ns, [sys.executable, "-c", RECEIVER]),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for where, ns in (("client", client.ns), ("server", lab.server_ns))}
        try:
            for rx in receivers.values():
                assert rx.stdout is not None and rx.stdout.readline().strip() == "listening"
            drops_before, queued_before = dropped(lab), queued(lab)
            maps_before = kernel_maps(lab.exec, lab.gw_ns)
            for ns, cases in ((client.ns, out_cases), (lab.server_ns, in_cases)):
                subprocess.run(lab.net.argv(ns, [sys.executable, "-c", SENDER,
                                                 json.dumps([{**c, "n": N} for c in cases])]),
                               cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                               check=True, timeout=30)
            # the call's own GRE meanwhile: still the program's (kernel) or the queue's
            own = s.phase("own", [0, 1], 10)
            got: dict[str, list[dict[str, Any]]] = {}
            for where, rx in receivers.items():
                assert rx.stdin is not None and rx.stdout is not None
                rx.stdin.write("stop\n")
                rx.stdin.flush()
                got[where] = json.loads(rx.stdout.readline())
                rx.wait(5)
        finally:
            for rx in receivers.values():
                if rx.poll() is None:
                    rx.kill()
                    rx.wait()
        drops_after, queued_after = dropped(lab), queued(lab)
        maps_after = kernel_maps(lab.exec, lab.gw_ns)
        after = s.phase("after", [0, 1], 5)  # pptpd ended no call: frames still pass
        r = s.finish(f"not_owned_{datapath}", {})
    names = {"server": server_cid, "client": client.addr}
    seen: dict[str, dict[str, Any]] = {}
    for tag in EXPECTED:
        seen[tag] = {
            "at_server": [{"src": p["src"], "cid": "server" if p["cid"] == server_cid
                           else "unknown" if p["cid"] == unknown_out else p["cid"]}
                          for p in got["server"] if p["kind"] == "gre" and p["tag"] == tag],
            "at_client": [{"src": p["src"], "cid": p["cid"]} for p in got["client"]
                          if p["kind"] == "gre" and p["tag"] == tag],
            "time_exceeded": sorted(
                ({"at": where, "inner_dst": "client" if p["inner_dst"] == names["client"]
                  else p["inner_dst"]}
                 for where in ("client", "server") for p in got[where]
                 if p["kind"] == "time_exceeded" and p["tag"] == tag), key=str)[:1],
            "unreachable": [{"src": p["src"]} for p in got["server"]
                            if p["kind"] == "unreachable" and p["tag"] == tag],
        }
    drops = {k: drops_after.get(k, 0) - v for k, v in drops_before.items()
             if drops_after.get(k, 0) != v}
    through = {n: queued_after[n] - queued_before.get(n, 0) for n in queued_after}
    info = (f"{datapath}: {json.dumps(seen, indent=1)}\ndrops {drops}\nqueued "
            f"{through}\nmaps {maps_before} -> {maps_after}\n"
            f"raw {got}\n{r.describe()}")
    assert own and after and all(c.clean for c in r.calls.values()), info
    assert seen == EXPECTED, info
    assert drops == {"no_call": NO_CALL}, info  # nothing else dropped, fragment included
    # the queues saw them (a reassembled packet once): inbound FRGI, OPTI, TTLI, UNKS;
    # outbound OPTO, SPOO (FRGO too, but see above), not TTLO: forwarding answers it
    # before any rule; not UNKO, UNKI: no set names them
    assert through[1724] >= 4 * N and through[1723] >= 2 * N, info
    if datapath == "kernel":  # the program translated the calls' own 2 x 10 frames each way
        for m in ("out_saddr", "in_daddr"):
            assert sum(maps_after[m].values()) >= sum(maps_before[m].values()) + 20, info
