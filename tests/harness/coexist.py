"""Issue 16's real-peer scenarios: other PPTP and GRE on and through the gateway.

Each runs against any :class:`~tests.harness.scenarios.Gateway` made by
:func:`gateway_variant` (plain NAT rules, the kernel helper, or natedit's worker on
top of the same rules) and returns a :class:`ScenarioResult`; the tests decide what
each variant must achieve. Topologies: :mod:`natedit.lab.coexist`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from natedit.lab import coexist
from natedit.lab.peers import start_pptpd
from natedit.lab.topology import PUBLIC_GW_ADDR, Lab

from .scenarios import Gateway, ScenarioResult, Session, session

FORCED = 0x1234
GATEWAY_CALL_ID = 0x4321  # the gateway's own pptp-linux call (not natedit's)
GREV0 = Path(__file__).with_name("grev0.py")
METRICS = "http://127.0.0.1:9723/metrics"

# natedit's counters that would move if it touched a packet (queue ids count every
# packet the kernel handed it).
TOUCH_COUNTERS = ("natedit_queue_packets_total", "natedit_gre_packets_total",
                  "natedit_kernel_gre_packets_total",
                  "natedit_gre_bytes_total", "natedit_packets_dropped_total",
                  "natedit_packets_passed_total", "natedit_malformed_packets_total")

_SCRAPE = f"""
import sys, urllib.request
try:
    with urllib.request.urlopen({METRICS!r}, timeout=5) as r:
        sys.stdout.write(r.read().decode())
except OSError:
    pass
"""
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([-+0-9.eEinfNa]+)$")


def scrape(lab: Lab) -> dict[str, float]:
    """natedit's metrics in the gateway (``name{labels}`` -> value); {} without a worker."""
    text = lab.exec(lab.gw_ns, [sys.executable, "-c", _SCRAPE], check=False).stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def touched(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much each of natedit's per-packet counters moved between two scrapes."""
    moved: dict[str, float] = {}
    for key, value in after.items():
        if key.split("{")[0] in TOUCH_COUNTERS and value != before.get(key, 0.0):
            moved[key] = value - before.get(key, 0.0)
    return moved


def gateway_variant(base: Gateway, *extra: Callable[[Lab], object]) -> Gateway:
    """``base`` (plain, helper or natedit) with the operator's ``extra`` rules first."""

    def setup(lab: Lab) -> None:
        for step in extra:
            step(lab)
        base.setup(lab)

    return Gateway(base.name, setup)


def publish_inside_server(lab: Lab) -> None:
    """The operator's port forward of :func:`natedit.lab.coexist.port_forward`."""
    coexist.port_forward(lab.gateway, PUBLIC_GW_ADDR)


def _finish(s: Session, scenario: str, outcome: dict[str, Any],
            groups: Mapping[str, Sequence[int]]) -> ScenarioResult:
    outcome["metrics"] = scrape(s.lab)
    result = s.finish(scenario, outcome)
    result.outcome["groups"] = {
        name: [(result.call(k).sent, result.call(k).received) for k in keys]
        for name, keys in groups.items()
    }
    result.outcome["clean"] = {
        name: all(result.call(k).clean for k in keys) for name, keys in groups.items()
    }
    return result


def port_forwarded_server(gateway: Gateway, *, frames: int = 30, hello_timeout: float = 3.0,
                          return_timeout: float = 2.0) -> ScenarioResult:
    """Issue 16 item 2: an inside pptpd published on the public address.

    Calls at the same time: ``inside`` (lab clients c1, c2 to the outside server, the
    calls natedit exists for), ``outside`` (oc1, oc2 on addresses of their own, to the
    public address), ``remote_nat`` (rc1, rc2 behind one remote NAT doing MASQUERADE
    and the kernel helper, so both come from one address), ``hairpin`` (c3 to the
    public address). Every call is forced onto Call ID 0x1234.
    """
    with session(gateway, 3, extra=coexist.PORT_FORWARD_LAB) as s:
        lab = s.lab
        lab.gateway_of(coexist.REMOTE_NAT, coexist.REMOTE_NAT_OUTSIDE_IF).kernel_helper()
        start_pptpd(lab, node=coexist.INSIDE_SERVER, address=coexist.INSIDE_SERVER_ADDR,
                    name="pptpd-inside")
        groups: dict[str, list[int]] = {"inside": [0, 1], "outside": [10, 11],
                                        "remote_nat": [20, 21], "hairpin": [30]}
        s.start_call(0, forced_call_id=FORCED, key=0)
        s.start_call(1, forced_call_id=FORCED, key=1)
        for i, (node, addr) in enumerate(coexist.OUTSIDE_CLIENTS.items()):
            s.start_call(i, forced_call_id=FORCED, key=10 + i, node=node,
                         server=PUBLIC_GW_ADDR, address=addr)
        for i, (node, addr) in enumerate(coexist.REMOTE_CLIENTS.items()):
            s.start_call(i, forced_call_id=FORCED, key=20 + i, node=node,
                         server=PUBLIC_GW_ADDR, address=addr)
        s.start_call(2, forced_call_id=FORCED, key=30, server=PUBLIC_GW_ADDR)
        keys = [k for ks in groups.values() for k in ks]
        connected = s.wait_connected(keys, hello_timeout)
        returned = s.phase("burst", keys, frames, return_timeout)
        result = _finish(s, "port_forwarded_server",
                         {"all_connected": connected, "all_returned": returned}, groups)
    w = result.wire
    remote = coexist.REMOTE_NAT_ADDR
    result.outcome.update(
        remote_nat_control_connections=sorted(c for c in w.control_connections if c[0] == remote),
        remote_nat_call_ids=sorted(w.gre_call_ids(src=PUBLIC_GW_ADDR, dst=remote)),
        outside_call_ids={addr: sorted(w.gre_call_ids(src=PUBLIC_GW_ADDR, dst=addr))
                          for addr in coexist.OUTSIDE_CLIENTS.values()},
    )
    return result


def gateway_own_pptp(gateway: Gateway, *, frames: int = 30, hello_timeout: float = 3.0,
                     return_timeout: float = 2.0) -> ScenarioResult:
    """Issue 16 item 3: PPTP of the gateway itself, beside natedit's inside client.

    ``gateway_client``: pptp-linux on the gateway to the outside pptpd (its control
    connection leaves through OUTPUT from the public address); ``gateway_server``: a
    pptpd on the gateway's public address, called by outside client oc1; ``inside``:
    lab client c1 to the outside pptpd.
    """
    with session(gateway, 1, extra=coexist.GATEWAY_PPTP_LAB) as s:
        lab = s.lab
        start_pptpd(lab, node="gw", address=PUBLIC_GW_ADDR, name="pptpd-gateway")
        groups: dict[str, list[int]] = {"inside": [0], "gateway_client": [40],
                                        "gateway_server": [10]}
        s.start_call(0, forced_call_id=FORCED, key=0)
        s.start_call(0, forced_call_id=GATEWAY_CALL_ID, key=40, node="gw",
                     address=PUBLIC_GW_ADDR)
        s.start_call(0, forced_call_id=FORCED, key=10, node="oc1", server=PUBLIC_GW_ADDR,
                     address=coexist.OUTSIDE_CLIENTS["oc1"])
        keys = [k for ks in groups.values() for k in ks]
        connected = s.wait_connected(keys, hello_timeout)
        returned = s.phase("burst", keys, frames, return_timeout)
        result = _finish(s, "gateway_own_pptp",
                         {"all_connected": connected, "all_returned": returned}, groups)
    return result


def _grev0_send(lab: Lab, node: str, dst: str, count: int) -> dict[str, Any]:
    res = lab.exec(lab.node(node), [sys.executable, str(GREV0), "send", dst,
                                    "--count", str(count)], timeout=20)
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def _start_echo(s: Session, node: str) -> Any:
    proc = s.lab.popen(s.lab.node(node), [sys.executable, str(GREV0), "echo"],
                       name=f"grev0-echo-{node}")
    deadline = time.monotonic() + 5
    while "ready" not in s.lab.process_log(proc):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"GRE v0 echo on {node}: {s.lab.process_log(proc)}")
        time.sleep(0.01)
    return proc


GREV0_FLOWS = {
    "through": ("c1", "oc2", coexist.OUTSIDE_CLIENTS["oc2"]),  # inside to outside, MASQUERADE
    "to_gateway": ("oc1", "gw", PUBLIC_GW_ADDR),  # outside to the gateway's public address
    "inside_to_gateway": ("c1", "gw", "10.0.0.1"),  # inside to the gateway's inside address
}
"""Flow name: (sender node, echo node, address sent to). The outside peers are not the
PPTP server: without keys, conntrack sees all GRE v0 between two addresses as one
connection, and pptpd's first Call ID is 0, so an untracked-helper PPTP call's GRE
would look like GRE v0 too."""


def grev0_tunnels(gateway: Gateway, *, count: int = 200, frames: int = 20,
                  settle: float = 1.0, pptp: bool = True) -> ScenarioResult:
    """Issue 16 item 5: GRE version 0 through and to the gateway, beside a PPTP call.

    Raw-socket peers (``tests/harness/grev0.py``) echo GRE v0 on oc2 and on the
    gateway; each flow of :data:`GREV0_FLOWS` sends ``count`` requests
    (``outcome["flows"]``: sent, intact replies, bytes each way). Lab client c2 has a
    PPTP call to srv, flowing before and after the GRE v0 flows (``pptp=False``: no
    call, for a gateway that cannot carry one).
    ``outcome["natedit_touched"]``: natedit's per-packet counters that moved while only
    GRE v0 flowed (empty: it never saw those packets; None: no natedit).
    """
    extra = coexist.INTERNET + coexist.outside_clients(*coexist.OUTSIDE_CLIENTS)
    with session(gateway, 2, extra=extra) as s:
        lab = s.lab
        for node in {echo for _, echo, _ in GREV0_FLOWS.values()}:
            _start_echo(s, node)
        calls = [1] if pptp else []
        for key in calls:
            s.start_call(key, forced_call_id=FORCED, key=key)
        connected = s.wait_connected(calls)
        before = s.phase("before", calls, frames)
        s.pump.linger(settle)
        m0 = scrape(lab)
        flows = {name: _grev0_send(lab, src, dst, count)
                 for name, (src, _, dst) in GREV0_FLOWS.items()}
        m1 = scrape(lab)
        after = s.phase("after", calls, frames)
        result = _finish(s, "grev0_tunnels",
                         {"pptp_connected": connected, "pptp_before": before,
                          "pptp_after": after, "flows": flows,
                          "natedit_touched": touched(m0, m1) if m0 else None},
                         {"pptp": calls})
    return result
