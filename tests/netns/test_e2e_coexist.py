"""Issue 16's real peers: other PPTP and GRE on and through the gateway (items 2, 3, 5).

Each scenario of :mod:`tests.harness.coexist` runs against plain NAT rules (the
operator's, nothing else), the kernel helper on top of them, and natedit's worker on
top of them (its built-in default policy): a port-forwarded inside pptpd with
outside clients (two on their own addresses, two behind one remote NAT) and a hairpin
client, while natedit's inside clients call an outside server; the gateway's own
pptp-linux and pptpd; GRE version 0 through and to the gateway (raw-socket peers),
which natedit must never count. The README's real-peer table has the figures.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import KERNEL_HELPER, MASQUERADE_ONLY, ScenarioResult, coexist, require_netns
from tests.harness.scenarios import Gateway, natedit_gateway

pytestmark = pytest.mark.netns



NATEDIT = natedit_gateway("natedit", state=True)
NATEDIT_KERNEL = natedit_gateway("natedit-kernel", "datapath: kernel\n", state=True)

PLAIN = pytest.param(MASQUERADE_ONLY, id="plain")
HELPER = pytest.param(KERNEL_HELPER, id="kernel-helper")
VARIANTS = [PLAIN, HELPER, pytest.param(NATEDIT, id="natedit"),
            pytest.param(NATEDIT_KERNEL, id="natedit-kernel")]
"""The PPTP scenarios' gateways: the baselines and both of natedit's datapaths."""
NATEDITS = (NATEDIT, NATEDIT_KERNEL)


@pytest.fixture(autouse=True)
def _real_peers() -> None:
    require_netns()


def assert_removed(result: ScenarioResult) -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [ln for ln in listed.splitlines() if ln.startswith(f"{result.prefix}-")]
    assert not left, f"namespaces left behind: {left}"


def assert_natedit_dropped_nothing(result: ScenarioResult, own_calls: int) -> None:
    """natedit ran to the end, dropped nothing (no_call was the failure before issue 16
    item 1) and mapped exactly its ``own_calls`` (the inside clients' calls and the
    gateway's own client's, nobody else's: not those of a pptpd on or behind it)."""
    info = result.describe()
    assert result.gateway_alive, info
    metrics = result.outcome["metrics"]
    assert metrics, info  # it was scraped while running
    dropped = {k: v for k, v in metrics.items()
               if k.startswith("natedit_packets_dropped_total") and v}
    assert not dropped, f"{dropped}\n{info}"
    assert metrics.get("natedit_calls_mapped_total") == own_calls, info


# ------------------------------------------------------------------ item 2: port forward

ALL_CLEAN = {"inside": True, "outside": True, "remote_nat": True, "hairpin": True}


@pytest.mark.parametrize("base", VARIANTS)
def test_port_forwarded_inside_server(base: Gateway) -> None:
    """An inside pptpd published by DNAT (TCP 1723 and GRE): 2 outside clients on their
    own addresses, 2 behind one remote NAT and a hairpin client, all on Call ID 0x1234,
    while 2 inside clients call the outside server. Plain NAT carries everything but
    the inside clients' calls (no GRE comes back: that is what natedit is for); the
    kernel helper and natedit carry every frame home."""
    r = coexist.port_forwarded_server(coexist.gateway_variant(base, coexist.publish_inside_server))
    assert_removed(r)
    info = r.describe()
    # the set-up is what it claims: both remote clients come from the remote NAT's one
    # address, on two control connections and two Call IDs (its helper's)
    assert len(r.outcome["remote_nat_control_connections"]) == 2, info
    assert len(r.outcome["remote_nat_call_ids"]) == 2, info
    expected = dict(ALL_CLEAN, inside=base is not MASQUERADE_ONLY)
    assert r.outcome["clean"] == expected, info
    assert r.total_foreign == 0, info
    if base is MASQUERADE_ONLY:
        assert all(r.call(k).received == 0 for k in (0, 1)), info
    if base in NATEDITS:
        assert_natedit_dropped_nothing(r, own_calls=2)


# ------------------------------------------------------------------ item 3: the gateway's own

@pytest.mark.parametrize("base", VARIANTS)
def test_gateway_own_pptp(base: Gateway) -> None:
    """pptp-linux on the gateway to the outside pptpd, a pptpd on the gateway called by
    an outside client, and an inside client to the outside pptpd, at once. MASQUERADE
    alone carries the gateway's own calls (their GRE is the gateway's, no NAT needed),
    not the inside client's; the helper and natedit carry all three. natedit maps the
    gateway's own client's call too (its Call ID then cannot collide with an inside
    call's), not the gateway pptpd's."""
    r = coexist.gateway_own_pptp(base)
    assert_removed(r)
    info = r.describe()
    assert r.outcome["clean"] == {"inside": base is not MASQUERADE_ONLY,
                                  "gateway_client": True, "gateway_server": True}, info
    assert r.total_foreign == 0, info
    if base in NATEDITS:
        assert_natedit_dropped_nothing(r, own_calls=2)


# ------------------------------------------------------------------ item 5: GRE version 0

@pytest.mark.parametrize("base", [
    PLAIN, HELPER, pytest.param(NATEDIT, id="natedit"),
    pytest.param(NATEDIT_KERNEL, id="natedit-kernel")])
def test_gre_v0_passes_untouched(base: Gateway) -> None:
    """GRE version 0 (keyed and unkeyed) from an inside host through MASQUERADE to an
    outside one, from an outside host to the public address and from an inside host to
    the gateway: every packet comes back byte for byte, and natedit's per-packet
    counters do not move while it flows (it never sees it), beside a PPTP call that
    keeps flowing (not under plain NAT, which cannot carry one)."""
    plain = base is MASQUERADE_ONLY
    r = coexist.grev0_tunnels(base, pptp=not plain)
    assert_removed(r)
    info = r.describe()
    for name, flow in r.outcome["flows"].items():
        assert flow["sent"] == flow["intact"] == 200, (name, info)
        assert flow["bytes_received"] == flow["bytes_sent"], (name, info)
        assert flow["other_sources"] == 0, (name, info)
    if not plain:
        assert r.outcome["clean"] == {"pptp": True}, info
        assert r.call(1).phases["after"].complete, info
    if base in NATEDITS:
        assert r.outcome["natedit_touched"] == {}, info
        assert_natedit_dropped_nothing(r, own_calls=1)


NATEDIT_POOL_OF_THE_GATEWAYS_ID = natedit_gateway(
    "natedit-pool", f"call_ids:\n  first: {coexist.GATEWAY_CALL_ID}\n"
                    f"  last: {coexist.GATEWAY_CALL_ID}\n", state=True)


def test_gateway_own_call_id_is_not_given_to_an_inside_call() -> None:
    """The collision forced: natedit's pool is the one Call ID (0x4321) the gateway's own
    pptp-linux call uses toward the same server. natedit queues the gateway's own control
    connection (OUTPUT, INPUT) and maps its call like an inside client's, to a Call ID
    outside the policy's range (which is the inside clients'): every call comes home."""
    r = coexist.gateway_own_pptp(NATEDIT_POOL_OF_THE_GATEWAYS_ID)
    assert_removed(r)
    info = r.describe()
    assert r.outcome["clean"] == {"inside": True, "gateway_client": True,
                                  "gateway_server": True}, info
    assert_natedit_dropped_nothing(r, own_calls=2)
