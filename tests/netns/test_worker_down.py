"""``on_worker_down`` with real peers, the worker SIGKILLed (issue 12 item 5; issue 16:
natedit's own calls fail closed, what natedit does not own keeps flowing).

The namespace lab (pptpd, pptp-linux, a gateway that masquerades) runs ``natedit
run`` with ``on_worker_down: drop`` or ``pass``. A call is set up through natedit
(its GRE in the ownership sets), frames flow, then the worker is SIGKILLed: its
rules and sets stay, nobody is bound to the queues. While it is down:

* natedit's call sends nothing out: the server's ingress counts none of its GRE, and
  nothing at all with a private source (an nftables counter on the server's
  interface, in both modes); none of its frames comes back;
* traffic natedit does not own keeps flowing: enhanced GRE with a Call ID no call
  has, masqueraded to the server;
* a new call: with ``drop`` its TCP 1723 connection is queued to nobody and never
  gets through (no Start-Control-Connection-Request on the outside); with ``pass``
  its control connection goes through untranslated (``--queue-bypass``):
  pptp-linux's own Call ID on the wire, MASQUERADE's public address, and the call
  is set up. Its outbound GRE is in no set, so it is not natedit's either; but the
  server's GRE to it comes from the server of natedit's first call, to the same public
  address (set own_peer): it is claimed and, with no worker bound, dropped, silently.
  No frame of the new call comes back, and no ICMP protocol-unreachable reaches the
  server (which would make pptpd end its calls with the gateway). (To a server natedit
  has no call with, it would be the reply of no conntrack entry, conntrack without the
  kernel's PPTP helper cannot key GRE v1, and the gateway would answer it with ICMP
  protocol-unreachable, as without natedit: the README says so.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from natedit.core.wire import build_gre
from natedit.lab.topology import PUBLIC_GW_ADDR, SERVER_ADDR, Lab
from tests.harness import require_netns, scenarios
from tests.harness.capture import OCRP, OCRQ
from tests.harness.scenarios import Gateway, natedit_gateway
from tests.netns.test_worker_netns import GRE_RECEIVER, GRE_SENDER

pytestmark = pytest.mark.netns

FORCED = 0x1234
SCCRQ = 1
"""Start-Control-Connection-Request."""
NEW = 0x2345
"""pptp-linux's Call ID for the call set up while the worker is down."""
UNOWNED = 0x4242
"""A server Call ID no call has."""


def natedit(mode: str) -> Gateway:
    return natedit_gateway(f"natedit-{mode}", f"on_worker_down: {mode}\n")


def counters(lab: Lab) -> dict[str, int]:
    text = lab.exec(lab.server_ns, ["nft", "-j", "list", "counters", "table", "netdev",
                                    "worker_down"]).stdout
    return {o["counter"]["name"]: o["counter"]["packets"]
            for o in json.loads(text)["nftables"] if "counter" in o}


def server_counts(lab: Lab, server_call_id: int) -> None:
    """Counters on the server's interface: the natedit call's GRE (from the public
    address, its server Call ID) and anything with a private source."""
    script = f"""table netdev worker_down {{
\tcounter call {{}}
\tcounter private {{}}
\tchain rx {{
\t\ttype filter hook ingress device eth0 priority 0; policy accept;
\t\tip saddr 10.0.0.0/8 counter name private
\t\tip protocol gre ip saddr {PUBLIC_GW_ADDR} @th,48,16 {server_call_id} counter name call
\t}}
}}
"""
    lab.exec(lab.server_ns, ["nft", "-f", "-"], input=script)


def unowned_gre(lab: Lab, client: int) -> bytes:
    """Enhanced GRE with a Call ID no call has, from ``client`` to the server: what the
    server got of it (b"": nothing)."""
    src = lab.clients[client]
    recv = subprocess.Popen(lab.net.argv(lab.server_ns, [sys.executable, "-c", GRE_RECEIVER,
                                                         "2", "not-natedits"]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "listening"
        packet = build_gre(src.addr, SERVER_ADDR, UNOWNED, b"not-natedits")
        lab.exec(src.ns, [sys.executable, "-c", GRE_SENDER, packet.hex(), SERVER_ADDR])
        line = recv.stdout.readline().strip()
    finally:
        recv.kill()
        recv.wait()
    return b"" if line == "timeout" else bytes.fromhex(line)


@pytest.mark.parametrize("mode", ["drop", "pass"])
def test_worker_down(mode: str) -> None:
    require_netns()
    with scenarios.session(natedit(mode), 2) as s:
        lab = s.lab
        s.start_call(0, forced_call_id=FORCED)
        connected = s.wait_connected([0])
        calls = json.loads(lab.exec(lab.gw_ns, [
            sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9723/calls', timeout=5).read().decode())"]).stdout)["calls"]
        [call] = calls
        server_counts(lab, call["server_call_id"])
        before = s.phase("before", [0], 10)
        rc = lab.stop_process(lab.gateway_processes[0], signal.SIGKILL, 5.0)
        rules = lab.exec(lab.gw_ns, ["nft", "list", "table", "ip", "natedit"]).stdout
        at_kill = counters(lab)
        down = s.phase("down", [0], 10, timeout=1.5)
        after_down = counters(lab)
        stray = unowned_gre(lab, 1)
        s.start_call(1, forced_call_id=NEW)
        new_connected = s.wait_connected([1])
        new = s.phase("new", [1], 10, timeout=2.0) if new_connected else False
        at_end = counters(lab)
        r = s.finish(f"worker_down_{mode}", {})
    info = (f"{mode}: counters at the kill {at_kill}, after the down phase {after_down}, "
            f"at the end {at_end}\n{r.describe()}")
    assert connected and before, info
    assert rc == -signal.SIGKILL, info
    assert "own_in" in rules and "elements" in rules, info  # the sets outlive the worker
    # natedit's own call fails closed: nothing of it leaves, nothing comes back
    assert not down and r.calls[0].phases["down"].returned == 0, info
    assert after_down["call"] == at_kill["call"] and at_kill["call"] > 0, info
    # ... and nothing ever reached the outside with a private source
    assert at_end["private"] == 0, info
    assert not [g for g in r.wire.gre if g.src.startswith("10.")], info
    # what natedit does not own keeps flowing
    assert stray[12:20] == bytes([198, 51, 100, 1, 198, 51, 100, 2]), info  # MASQUERADEd
    requests = [m for m in r.wire.messages(SCCRQ) if m.src == PUBLIC_GW_ADDR]
    if mode == "drop":
        assert not new_connected, info
        assert len(requests) == 1, info  # the new control connection never got out
        return
    # pass: the new call goes through untranslated, masqueraded, and is set up ...
    assert len(requests) == 2, info
    [request] = [m for m in r.wire.messages(OCRQ) if m.call_id == NEW]
    assert request.src == PUBLIC_GW_ADDR, info  # pptp-linux's own Call ID, MASQUERADE
    [reply] = [m for m in r.wire.messages(OCRP) if m.peer_call_id == NEW]
    assert reply.result == 1, info
    # ... but the server's GRE for it comes from natedit's first call's server to the
    # same public address (set own_peer): claimed, and dropped with no worker bound, with
    # no ICMP protocol-unreachable back (pptpd would end its calls with the gateway)
    assert not [i for i in r.wire.icmp if i.icmp_type == 3 and i.quoted_proto == 47], info
    assert not new_connected and not new, info
