"""Several public addresses with the real peers (issue 16 item 4).

The gateway's outside interface has two addresses, 198.51.100.1 and 198.51.100.3;
SNAT rules put the clients behind one or the other: per network (10.0.0.12/31 ->
.3, the rest -> .1), or an SNAT pool (``--to-source 198.51.100.3-198.51.100.4``).
Every client forces Call ID 0x1234 toward the one pptpd. natedit's policy lists
the addresses; its worker reads each control connection's NAT address from
conntrack (natedit/conntrack.py, pyroute2's ctnetlink), and each call must get
that one: every frame home, and Call IDs unique per (public address, server) --
a range of two public Call IDs serves two calls on each address. The kernel
helper runs the same scenario as the baseline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from natedit.lab.netns import Address, Topology
from natedit.lab.topology import GW_OUTSIDE_IF, SERVER_ADDR, Lab
from tests.harness import ScenarioResult, require_netns
from tests.harness.capture import OCRQ
from tests.harness.scenarios import Gateway, session, worker_gateway

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
FORCED = 0x1234
A, B, C = "198.51.100.1", "198.51.100.3", "198.51.100.4"
N_CLIENTS = 4
ON_B = "10.0.0.12/31"
"""Clients 10.0.0.12 and .13 leave as B; 10.0.0.11 and .14 as A."""
FRAMES = 40


@pytest.fixture(autouse=True)
def _real_peers() -> None:
    require_netns()


def per_network_snat(lab: Lab) -> None:
    lab.iptables("-t", "nat", "-I", "POSTROUTING", "1", "-s", ON_B, "-o", GW_OUTSIDE_IF,
                 "-j", "SNAT", "--to-source", B)
    lab.iptables("-t", "nat", "-I", "POSTROUTING", "2", "-o", GW_OUTSIDE_IF,
                 "-j", "SNAT", "--to-source", A)


def pool_snat(lab: Lab) -> None:
    lab.iptables("-t", "nat", "-I", "POSTROUTING", "1", "-o", GW_OUTSIDE_IF,
                 "-j", "SNAT", "--to-source", f"{B}-{C}")


def natedit(snat: Callable[[Lab], None], publics: list[str], datapath: str,
            ids: tuple[int, int] = (16384, 16385)) -> Gateway:
    """natedit on ``publics``, with the public Call IDs ``ids`` (first, last)."""
    def argv(lab: Lab, ready: Path) -> list[str]:
        policy = lab.tmpdir / "natedit.yaml"
        policy.write_text(f"public_address: [{', '.join(publics)}]\n"
                          f"call_ids:\n  first: {ids[0]}\n  last: {ids[1]}\n"
                          f"datapath: {datapath}\n")
        return [sys.executable, "-m", "natedit", "run", "--policy", str(policy),
                "--ready-file", str(ready), "--pid-file", str(lab.tmpdir / "natedit.pid")]

    def base(lab: Lab) -> None:
        lab.gateway_masquerade_only()
        snat(lab)

    return worker_gateway(f"natedit-{datapath}", argv, base=base, cwd=str(REPO))


def kernel_helper(snat: Callable[[Lab], None]) -> Gateway:
    def setup(lab: Lab) -> None:
        lab.gateway_kernel_helper()
        snat(lab)

    return Gateway("kernel-helper", setup)


def run(gateway: Gateway, extra_addresses: tuple[str, ...],
        calls: bool = False) -> ScenarioResult:
    """The scenario; ``calls``: ``natedit calls --json`` in the gateway while the calls
    live, into ``outcome["natedit_calls"]``."""
    extra = Topology(nodes=(), addresses=tuple(
        Address("gw", GW_OUTSIDE_IF, f"{a}/24") for a in extra_addresses))
    with session(gateway, N_CLIENTS, extra=extra) as s:
        keys = list(range(N_CLIENTS))
        for i in keys:
            s.start_call(i, forced_call_id=FORCED)
        connected = s.wait_connected(keys)
        returned = s.phase("burst", keys, FRAMES)
        listed = [] if not calls else [json.loads(line) for line in s.lab.exec(
            s.lab.gw_ns, [sys.executable, "-m", "natedit", "calls", "--json"]
        ).stdout.splitlines()]
        result = s.finish("public_addresses", {"all_connected": connected,
                                               "all_returned": returned,
                                               "natedit_calls": listed})
    return result


def events(result: ScenarioResult, name: str) -> list[dict[str, str]]:
    log = "\n".join(p.log_tail for p in result.gateway_processes)
    return [dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
            for line in log.splitlines() if f"event={name} " in line]


def leaving(result: ScenarioResult) -> dict[str, tuple[str, int]]:
    """Per client: (public address, public Call ID) its Outgoing-Call-Request left with,
    as the capture of the outside interface shows (the control connection's source
    port maps it to the client through conntrack's listing)."""
    by_port: dict[tuple[str, int], str] = {}
    for line in result.conntrack.splitlines():
        m = re.search(r"src=(10\.0\.0\.\d+) dst=\S+ sport=\d+ dport=1723 .*?"
                      r"src=\S+ dst=(\S+) sport=1723 dport=(\d+)", line)
        if m:
            by_port[(m.group(2), int(m.group(3)))] = m.group(1)
    return {by_port.get((m.src, m.sport), f"?{m.src}:{m.sport}"): (m.src, m.call_id or 0)
            for m in result.wire.messages(OCRQ)}


def assert_clean(result: ScenarioResult) -> None:
    info = result.describe()
    assert result.gateway_alive, info
    assert result.outcome["all_connected"], info
    assert result.outcome["all_returned"], info
    assert all(c.clean for c in result.calls.values()), info
    assert result.total_foreign == 0, info
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in listed.splitlines() if ln.startswith(f"{result.prefix}-")], info


def assert_unique_per_address(result: ScenarioResult, info: str) -> dict[str, list[int]]:
    """The public Call IDs on the wire: unique per (public address, server), and the
    server's GRE comes back to exactly them."""
    ids: dict[str, list[int]] = {}
    for m in result.wire.messages(OCRQ):
        assert m.dst == SERVER_ADDR, info
        ids.setdefault(m.src, []).append(m.call_id or 0)
    for public, seen in ids.items():
        assert len(seen) == len(set(seen)), info
        assert result.wire.gre_call_ids(src=SERVER_ADDR, dst=public) == set(seen), info
    return ids


@pytest.mark.parametrize("datapath", ["userspace", "kernel"])
def test_per_network_snat_natedit(datapath: str) -> None:
    r = run(natedit(per_network_snat, [A, B], datapath), (B,), calls=True)
    assert_clean(r)
    info = r.describe()
    ids = assert_unique_per_address(r, info)
    # two calls per address from a range of two public Call IDs: pools per address
    assert {p: sorted(v) for p, v in ids.items()} == {A: [16384, 16385], B: [16384, 16385]}, info
    left = leaving(r)
    assert {c: p for c, (p, _) in left.items()} == {
        "10.0.0.11": A, "10.0.0.12": B, "10.0.0.13": B, "10.0.0.14": A}, info
    mapped = {e["client_address"]: (e["public_address"], int(e["public_call_id"], 0))
              for e in events(r, "call_mapped")}
    assert mapped == left, info  # each call got its connection's NAT address
    assert not events(r, "call_refused"), info
    listed = {c["client_address"]: (c["public_address"], c["public_call_id"])
              for c in r.outcome["natedit_calls"]}
    assert listed == left, info  # natedit calls shows each call's public address


def test_per_network_snat_kernel_helper() -> None:
    """The baseline: the helper's public Call ID is the control connection's port."""
    r = run(kernel_helper(per_network_snat), (B,))
    assert_clean(r)
    info = r.describe()
    assert_unique_per_address(r, info)
    assert Counter(p for p, _ in leaving(r).values()) == {A: 2, B: 2}, info


def test_snat_pool_natedit() -> None:
    """An SNAT pool (--to-source B-C): which address each client gets is the kernel's
    choice (here 3 clients on one address); natedit reads it from conntrack and each
    call gets it."""
    r = run(natedit(pool_snat, [A, B, C], "userspace", ids=(16384, 16387)), (B, C))
    assert_clean(r)
    info = r.describe()
    assert_unique_per_address(r, info)
    left = leaving(r)
    assert set(left) == {f"10.0.0.{11 + i}" for i in range(N_CLIENTS)}, info
    assert {p for p, _ in left.values()} <= {B, C}, info
    mapped = {e["client_address"]: (e["public_address"], int(e["public_call_id"], 0))
              for e in events(r, "call_mapped")}
    assert mapped == left, info


def test_snat_pool_kernel_helper() -> None:
    r = run(kernel_helper(pool_snat), (B, C))
    assert_clean(r)
    assert_unique_per_address(r, r.describe())


def test_a_connection_nated_elsewhere_is_refused() -> None:
    """natedit lists only A: the clients SNATed to B get their calls refused
    (refused:not_public), the others are served; nothing leaves mapped to A for them."""
    r = run(natedit(per_network_snat, [A], "userspace"), (B,))
    info = r.describe()
    assert r.gateway_alive, info
    refused = {e["client_address"] for e in events(r, "call_refused")}
    assert refused == {"10.0.0.12", "10.0.0.13"}, info
    assert {e["reason"] for e in events(r, "call_refused")} == {"not_public"}, info
    mapped = {e["client_address"]: e["public_address"] for e in events(r, "call_mapped")}
    assert mapped == {"10.0.0.11": A, "10.0.0.14": A}, info
    assert all(r.calls[k].clean for k in (0, 3)), info
    assert all(not r.calls[k].connected or r.calls[k].received == 0 for k in (1, 2)), info
