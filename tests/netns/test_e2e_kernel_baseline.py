"""Baseline: the real peers (pptpd, pptp-linux) through the kernel's own PPTP NAT helper.

The same scenario functions run against natedit's worker in ``test_e2e_natedit.py``;
here they record what Linux itself achieves on this kernel, and what plain MASQUERADE
does (no GRE ever comes back). Every scenario builds its own namespaces and removes them.
"""

from __future__ import annotations

import subprocess

import pytest

from natedit.lab.topology import SERVER_ADDR
from tests.harness import KERNEL_HELPER, MASQUERADE_ONLY, ScenarioResult, require_netns, scenarios

pytestmark = pytest.mark.netns

FORCED = 0x1234


@pytest.fixture(autouse=True)
def _real_peers() -> None:
    require_netns()


def assert_cleaned_up(result: ScenarioResult) -> None:
    """No namespace of the scenario's lab is left behind."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [line for line in listed.splitlines() if line.startswith(f"{result.prefix}-")]
    assert not left, f"namespaces left behind: {left}"


def test_masquerade_alone_returns_no_gre() -> None:
    """Plain MASQUERADE: the server's GRE matches no conntrack entry (the GRE tracker keys
    by Call ID), the gateway answers it with ICMP protocol-unreachable, pptpd drops the
    call, and no frame ever comes back."""
    r = scenarios.same_call_id(MASQUERADE_ONLY, n_clients=2, call_id=FORCED)
    assert_cleaned_up(r)
    info = r.describe()
    assert r.outcome["ocrp_results"] == [1, 1], info  # the control channel itself works
    assert r.outcome["ocrq_call_ids_outside"] == [FORCED, FORCED], info  # nothing rewritten
    assert all(not c.connected and c.received == 0 for c in r.calls.values()), info
    assert r.wire.gre_count(src=SERVER_ADDR) >= 1, info
    assert r.outcome["icmp_unreachable_for_gre"] >= 1, info
    assert {i.code for i in r.wire.icmp if i.quoted_proto == 47} == {2}, info  # protocol unreach.
    assert all(c.eof for c in r.calls.values()), info  # every call was hung up


def test_same_call_id_three_clients() -> None:
    """(a) Three clients with the same private Call ID: the helper keeps them apart."""
    r = scenarios.same_call_id(KERNEL_HELPER, n_clients=3, call_id=FORCED)
    assert_cleaned_up(r)
    info = r.describe()
    assert r.outcome["all_connected"], info
    assert all(c.clean for c in r.calls.values()), info
    assert r.total_foreign == 0, info
    # The helper's public Call ID is the masqueraded TCP source port of the control
    # connection: distinct per client, and the one the server's GRE comes back to.
    public = r.outcome["ocrq_call_ids_outside"]
    assert len(set(public)) == 3, info
    assert {port for _, port in r.wire.control_connections} == set(public), info
    assert set(r.outcome["public_call_ids"]) == set(public), info
    # pptpd numbers its calls 0, 128, 256, ...
    assert r.outcome["ocrp_server_call_ids"] == [0, 128, 256], info
    assert r.outcome["server_call_ids"] == [0, 128, 256], info
    assert r.outcome["icmp_unreachable_for_gre"] == 0, info


def test_teardown_mid_stream_five_clients() -> None:
    """(b) Five clients; one pptp is killed by PID mid-stream; the others keep flowing."""
    r = scenarios.teardown_mid_stream(KERNEL_HELPER, n_clients=5, victim=2, call_id=FORCED)
    assert_cleaned_up(r)
    info = r.describe()
    assert r.outcome["all_connected"], info
    assert r.outcome["before_all_returned"], info
    assert r.outcome["after_survivors_returned"], info
    assert r.total_foreign == 0, info
    victim = r.call(2)
    assert victim.eof and victim.pptp_returncode is not None, info
    # pptp's call manager notices, clears the call on the wire and exits
    assert r.outcome["victim_call_manager_exited"], info
    assert r.outcome["call_clear_requests"] == 1, info
    for key in (0, 1, 3, 4):
        assert r.call(key).clean and r.call(key).phases["after"].complete, info


def test_two_calls_on_one_control_connection_is_not_supported() -> None:
    """(c) Two calls sharing one call manager (one control connection): recorded, not
    expected to work. The kernel helper gives both Outgoing-Call-Requests the same
    public Call ID (the TCP port), and pptpd replaces call 1 with call 2."""
    r = scenarios.two_calls_one_control(KERNEL_HELPER, call_ids=(FORCED, FORCED + 1))
    assert_cleaned_up(r)
    info = r.describe()
    # the set-up is what it claims to be
    assert r.outcome["private_call_ids_served"] == [FORCED, FORCED + 1], info
    assert r.outcome["call_manager_count"] == 1, info
    assert r.outcome["control_connections"] == 1, info
    assert r.outcome["first_call_connected"], info
    assert r.outcome["ocrp_results"] == [1, 1], info
    assert r.outcome["ocrp_server_call_ids"] == [0, 1], info  # pptpd's 2nd call on a connection
    assert r.outcome["server_replaced_first_call"], info
    # what the kernel helper does: one public Call ID for both calls
    ocrq = r.outcome["ocrq_call_ids_outside"]
    assert len(ocrq) == 2 and ocrq[0] == ocrq[1], info
    assert not r.outcome["distinct_public_call_ids"], info
    # ... so the second call never works, and its frames land on the first call
    second = r.call(1)
    assert not second.connected and second.received == 0, info
    assert not r.outcome["both_returned"], info
    assert r.call(0).foreign_from.get(1, 0) > 0, info


def test_two_calls_on_one_control_connection_with_a_pac_that_takes_both() -> None:
    """(c) again, against the Python PAC, which answers both Outgoing-Call-Requests with
    calls of their own (0 and 128) and echoes each within its call. The server is no
    longer the limit, the kernel helper is: both requests leave with the same public
    Call ID (the TCP port), so the PAC sends both calls' GRE to that one ID and the
    helper delivers all of it to the first call's private Call ID. The second call never
    hears from the server; the first gets the second's frames, interleaved with its own
    under two unrelated sequence-number spaces (pptp-linux then drops whichever stream
    is behind as "duplicate or old")."""
    r = scenarios.two_calls_one_control(KERNEL_HELPER, call_ids=(FORCED, FORCED + 1), server="pac")
    assert_cleaned_up(r)
    info = r.describe()
    # the set-up is what it claims to be, and the PAC opened both calls
    assert r.server == "pac", info
    assert r.outcome["private_call_ids_served"] == [FORCED, FORCED + 1], info
    assert r.outcome["call_manager_count"] == 1, info
    assert r.outcome["control_connections"] == 1, info
    assert r.outcome["ocrp_results"] == [1, 1], info
    assert r.outcome["ocrp_server_call_ids"] == [0, 128], info
    assert not r.outcome["server_replaced_first_call"], info
    # the kernel helper: one public Call ID (the masqueraded TCP port) for both calls
    ((_, port),) = r.wire.control_connections
    assert r.outcome["ocrq_call_ids_outside"] == [port, port], info
    assert not r.outcome["distinct_public_call_ids"], info
    assert r.outcome["pac_calls"] == [(1, 0, port), (1, 128, port)], info
    assert r.outcome["ocrp_peer_call_ids"] == [port, port], info
    # both calls' GRE reaches the PAC (as 0 and 128) and comes back, to that one port
    assert r.outcome["server_call_ids"] == [0, 128], info
    assert r.outcome["public_call_ids"] == [port], info
    # ... where the helper hands all of it to the first call
    first, second = r.call(0), r.call(1)
    assert r.outcome["first_call_connected"], info
    assert not second.connected and second.received == 0 and second.foreign == 0, info
    assert first.foreign_from.get(1, 0) > 0, info
    assert not first.clean and not r.outcome["both_returned"], info


def test_server_ends_one_call() -> None:
    """(d) The server ends one call (SIGTERM to its pptpctrl: Call-Disconnect-Notify, then
    Stop-Control-Connection-Request); that client hangs up, the others keep flowing."""
    r = scenarios.server_ends_call(
        KERNEL_HELPER, n_clients=3, victim=1, how="pptpctrl", call_id=FORCED
    )
    assert_cleaned_up(r)
    info = r.describe()
    assert r.outcome["all_connected"], info
    assert r.outcome["before_all_returned"], info
    assert r.outcome["after_survivors_returned"], info
    assert r.total_foreign == 0, info
    assert r.outcome["victim_hung_up"] and r.outcome["victim_pptp_exited"], info
    # pptpd puts its own Call ID (128 for the second connection) in the CDN, and the
    # kernel helper rewrites that field to the client's private Call ID on the way in.
    assert r.outcome["cdn_call_ids_outside"] == [128], info
    assert r.outcome["cdn_call_ids_received_by_client"] == [FORCED], info
    assert r.outcome["stop_control_requests"] == 1, info
    for key in (0, 2):
        assert r.call(key).clean and r.call(key).phases["after"].complete, info
