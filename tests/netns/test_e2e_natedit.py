"""natedit's worker with the real peers: the scenarios of the kernel baseline.

Each scenario builds a fresh namespace lab (pptpd, pptp-linux clients forced
onto one Call ID, a gateway doing MASQUERADE for TCP 1723) and runs
``python -m natedit run`` in the gateway on its built-in default policy: the
public address is found from the default route, the inside networks are
RFC 1918. The worker's call events (one logfmt line each) tell what its
call table did. The scenarios that matter run in both datapaths: every GRE
packet through the queue (``userspace``, the default), and GRE of
established calls translated by the worker's tc-BPF program (``kernel``).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from natedit.lab.topology import SERVER_ADDR, Lab
from tests.harness import ScenarioResult, require_netns, scenarios
from tests.harness.kernel import attached
from tests.harness.scenarios import Gateway, worker_gateway

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
FORCED = 0x1234
PUBLIC = "198.51.100.1"

NATEDIT = worker_gateway(
    "natedit",
    lambda lab, ready: [sys.executable, "-m", "natedit", "run", "--ready-file", str(ready),
                        "--pid-file", str(lab.tmpdir / "natedit.pid"),
                        "--state", str(lab.tmpdir / "state.db")],
    cwd=str(REPO),
)


def kernel_policy(lab: Lab) -> str:
    """The built-in policy but ``datapath: kernel``, as a file in the lab's directory."""
    path = lab.tmpdir / "natedit-kernel.yaml"
    path.write_text("datapath: kernel\n")
    return str(path)


NATEDIT_KERNEL = worker_gateway(
    "natedit-kernel",
    lambda lab, ready: [sys.executable, "-m", "natedit", "run", "--ready-file", str(ready),
                        "--pid-file", str(lab.tmpdir / "natedit.pid"),
                        "--state", str(lab.tmpdir / "state.db"),
                        "--policy", kernel_policy(lab)],
    cwd=str(REPO),
)
DATAPATHS = pytest.mark.parametrize("gateway", [NATEDIT, NATEDIT_KERNEL],
                                    ids=["userspace", "kernel"])


@pytest.fixture(autouse=True)
def _real_peers() -> None:
    require_netns()


def events(result: ScenarioResult, name: str) -> list[dict[str, str]]:
    """The worker's ``event=<name>`` log lines as dicts."""
    log = "\n".join(p.log_tail for p in result.gateway_processes)
    out = []
    for line in log.splitlines():
        if f"event={name} " in line:
            out.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line)))
    return out


def assert_clean_exit(result: ScenarioResult) -> None:
    info = result.describe()
    assert result.gateway_alive, info  # it ran to the end of the scenario
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in listed.splitlines() if ln.startswith(f"{result.prefix}-")], info


@DATAPATHS
def test_same_call_id_three_clients(gateway: Gateway) -> None:
    """(a) Three clients, one private Call ID, one server: every frame comes home."""
    r = scenarios.same_call_id(gateway, n_clients=3, call_id=FORCED)
    assert_clean_exit(r)
    info = r.describe()
    assert r.outcome["all_connected"], info
    assert all(c.clean for c in r.calls.values()), info
    assert r.total_foreign == 0, info
    public = r.outcome["ocrq_call_ids_outside"]
    assert len(public) == 3 and len(set(public)) == 3, info  # distinct on the wire (tshark)
    assert FORCED not in public or public.count(FORCED) <= 1, info
    assert set(r.outcome["public_call_ids"]) == set(public), info  # the server's GRE uses them
    assert r.wire.gre_call_ids(src=PUBLIC, dst=SERVER_ADDR) == {0, 128, 256}, info
    mapped = events(r, "call_mapped")
    assert sorted(int(e["public_call_id"], 0) for e in mapped) == sorted(public), info
    assert {int(e["client_call_id"], 0) for e in mapped} == {FORCED}, info
    assert r.outcome["icmp_unreachable_for_gre"] == 0, info


@DATAPATHS
def test_teardown_mid_stream_five_clients(gateway: Gateway) -> None:
    """(b) Five clients; one pptp is killed mid-stream: the others keep flowing and the
    victim's mapping leaves the table."""
    r = scenarios.teardown_mid_stream(gateway, n_clients=5, victim=2, call_id=FORCED)
    assert_clean_exit(r)
    info = r.describe()
    assert r.outcome["all_connected"], info
    assert r.outcome["before_all_returned"], info
    assert r.outcome["after_survivors_returned"], info
    assert r.total_foreign == 0, info
    victim_addr = r.call(2).client_addr
    released = [e for e in events(r, "call_released") if e["client_address"] == victim_addr]
    assert released, info
    # released before the end of the scenario, by the control conversation (the call
    # manager's Call-Clear-Request, then the server's Call-Disconnect-Notify or the
    # TCP close), not by the teardown that ends the other calls
    assert released[0]["reason"] in ("disconnect", "fin", "stop", "reset"), info
    survivors_released_early = [
        e for e in events(r, "call_released")
        if e["client_address"] != victim_addr and e["reason"] not in ("fin", "stop", "reset",
                                                                       "disconnect")
    ]
    assert not survivors_released_early, info


@DATAPATHS
def test_server_ends_call(gateway: Gateway) -> None:
    """(d) The server ends one call (its pptpctrl sends Call-Disconnect-Notify, then
    Stop-Control-Connection-Request): the mapping is released, the client is told with
    its own Call ID, the others keep flowing."""
    r = scenarios.server_ends_call(gateway, n_clients=3, victim=1, how="pptpctrl",
                                   call_id=FORCED)
    assert_clean_exit(r)
    info = r.describe()
    assert r.outcome["before_all_returned"], info
    assert r.outcome["after_survivors_returned"], info
    assert r.outcome["victim_hung_up"], info
    assert r.total_foreign == 0, info
    # disconnect_rule: client (default) - pptp-linux finds its call by its own Call ID
    assert r.outcome["cdn_call_ids_received_by_client"] == [FORCED], info
    victim_addr = r.call(1).client_addr
    released = [e for e in events(r, "call_released") if e["client_address"] == victim_addr]
    assert released and released[0]["reason"] == "disconnect", info


@DATAPATHS
def test_server_stops_pptpd_standin(gateway: Gateway) -> None:
    """(d') The server side's "pppd" exits: pptpctrl closes TCP without a
    Call-Disconnect-Notify; the TCP close releases the mapping."""
    r = scenarios.server_ends_call(gateway, n_clients=2, victim=0, how="standin",
                                   call_id=FORCED)
    assert_clean_exit(r)
    info = r.describe()
    assert r.outcome["after_survivors_returned"], info
    victim_addr = r.call(0).client_addr
    released = [e for e in events(r, "call_released") if e["client_address"] == victim_addr]
    assert released and released[0]["reason"] in ("fin", "reset"), info


# -- the worker restarted during traffic -----------------------------------------------------


def iptables_save(lab: Lab) -> str:
    """The gateway's iptables ruleset without comments and counters."""
    text = lab.exec(lab.gw_ns, ["iptables-save"]).stdout
    return "\n".join(re.sub(r"\[\d+:\d+\]", "", ln) for ln in text.splitlines()
                     if not ln.startswith("#"))


def start_natedit(lab: Lab, name: str, state: str = "",
                  datapath: str = "userspace") -> subprocess.Popen[bytes]:
    ready = lab.tmpdir / f"{name}.ready"
    policy = ["--policy", kernel_policy(lab)] if datapath == "kernel" else []
    return lab.start_gateway_process(
        [sys.executable, "-m", "natedit", "run", "--ready-file", str(ready),
         "--pid-file", str(lab.tmpdir / f"{name}.pid"), "--state", state, *policy],
        ready=ready.exists, cwd=str(REPO), name=name)


def wait_for_no_fast_program(lab: Lab, timeout: float = 2.0) -> dict[str, int]:
    """The interfaces natedit's tc-BPF program is attached to, once there are none
    (after a SIGKILL the worker's guard process removes it, a few milliseconds
    later), or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = attached(lab.exec, lab.gw_ns)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@pytest.mark.parametrize(("sig", "kept", "datapath"), [
    (signal.SIGTERM, False, "userspace"), (signal.SIGTERM, True, "userspace"),
    (signal.SIGKILL, False, "userspace"), (signal.SIGKILL, True, "userspace"),
    (signal.SIGUSR2, True, "userspace"), (signal.SIGTERM, False, "kernel"),
    (signal.SIGKILL, True, "kernel"), (signal.SIGUSR2, True, "kernel")],
    ids=["sigterm-no-state", "sigterm-state", "sigkill-no-state", "sigkill-state",
         "sigusr2-state", "sigterm-no-state-kernel", "sigkill-state-kernel",
         "sigusr2-state-kernel"])
def test_worker_restart_during_traffic(sig: int, kept: bool, datapath: str) -> None:
    """The worker is stopped (SIGTERM: clean exit; SIGKILL: a crash; SIGUSR2: a stop for
    a restart) while two calls flow, then started again, on the same state file
    (``--state``) or with none (``--state ''``). What happens, exactly:

    * during the gap no frame of the live calls comes back: after SIGKILL and SIGUSR2
      the rules stay and queue to nobody (fail-closed); after SIGTERM the rules are gone,
      the kernel answers the server's GRE with ICMP protocol-unreachable, and pptpd ends
      the calls, state file or not;
    * after SIGKILL or SIGUSR2, with the state file, the restarted worker has the live
      calls back with their public Call IDs: their frames come back at once
      (tests/netns/test_e2e_restart.py measures the gap); without it, it starts with an empty
      table, so the calls that were live stay dead (their GRE is dropped as
      ``no_call``) until the clients call again;
    * a new call after the restart works;
    * the ruleset after the final stop is exactly what it was before natedit started,
      whether the first worker exited cleanly or was killed.

    With ``datapath: kernel`` the same holds: the worker's tc-BPF program goes when the
    worker exits, however it exits (after SIGKILL its guard process removes it), so
    during the gap GRE meets only the queue rules (or, after SIGTERM, none), and the
    restarted worker puts the restored calls into its maps before it attaches them.
    """
    before_natedit: dict[str, str] = {}
    state: dict[str, str] = {}

    def setup(lab: Lab) -> None:
        lab.gateway_masquerade_only()
        before_natedit["rules"] = iptables_save(lab)
        state["path"] = str(lab.tmpdir / "state.db") if kept else ""
        start_natedit(lab, "natedit-1", state["path"], datapath)

    with scenarios.session(Gateway("natedit-restart", setup), 2) as s:
        lab = s.lab
        keys = [0, 1]
        for i in keys:
            s.start_call(i, forced_call_id=FORCED)
        connected = s.wait_connected(keys)
        before = s.phase("before", keys, 20)
        first = lab.gateway_processes[0]
        rc = lab.stop_process(first, sig, 5.0)
        rules_after_stop = iptables_save(lab)
        fast_after_stop = wait_for_no_fast_program(lab)
        gap = s.phase("gap", keys, 10, timeout=1.0)
        start_natedit(lab, "natedit-2", state["path"], datapath)
        fast_restored = attached(lab.exec, lab.gw_ns)
        # the peers hold frames that follow a loss in the GRE sequence in a reorder buffer
        # until later frames push them out: a few frames first, not judged
        s.phase("resume", keys, 5, timeout=1.0)
        after = s.phase("after_restart", keys, 10, timeout=3.0 if kept else 1.0)
        # (client 2's first call may be live again: one host, two calls, two Call IDs)
        s.start_call(1, forced_call_id=FORCED + 1, key=2)
        new_connected = s.wait_connected([2])
        new_call = s.phase("new_call", [2], 20)
        second = lab.gateway_processes[1]
        rc2 = lab.stop_process(second, signal.SIGTERM, 5.0)
        rules_at_end = iptables_save(lab)
        fast_at_end = attached(lab.exec, lab.gw_ns)
        r = s.finish("worker_restart", {})
    info = r.describe()
    assert not fast_after_stop and not fast_at_end, info
    assert bool(fast_restored) == (datapath == "kernel"), info
    if datapath == "kernel":  # the restored calls go into the maps before it is attached
        restored_calls = 2 if kept and sig != signal.SIGTERM else 0
        log2 = r.gateway_processes[1].log_tail
        assert re.search(r"kernel datapath: tc-BPF program attached to \S.* with "
                         f"{restored_calls} calls", log2), info
        # in this order: the calls restored, the program attached (maps filled), ready
        order = [log2.find(s) for s in ("event=state_restored", "tc-BPF program attached",
                                        "natedit: ready ")]
        assert order == sorted(order) and order[1] >= 0, (order, info)
        assert (order[0] >= 0) == (restored_calls > 0), info
    assert connected and before, info
    if sig == signal.SIGTERM:
        assert rc == 0 and rules_after_stop == before_natedit["rules"], info
    else:  # fail-closed
        assert rc == (0 if sig == signal.SIGUSR2 else -sig), info
        assert "NATEDIT" in rules_after_stop, info
    assert not gap, info
    assert all(r.calls[k].phases["gap"].returned == 0 for k in keys), info
    restored = [ln for p in r.gateway_processes for ln in p.log_tail.splitlines()
                if "event=state_restored" in ln]
    assert restored == ([f"natedit: event=state_restored path={state['path']} calls=2 "
                         f"down_seconds={restored[0].rsplit('=', 1)[1]}"] if kept else []), info
    if sig == signal.SIGTERM:
        assert r.wire.icmp_unreachable_for_gre > 0, info
    if kept and sig != signal.SIGTERM:
        assert after, info
        assert all(r.calls[k].phases["after_restart"].complete for k in keys), info
    else:
        assert all(r.calls[k].phases["after_restart"].returned == 0 for k in keys), info
        assert not after, info
    assert new_connected and new_call and r.calls[2].clean, info
    assert rc2 == 0 and rules_at_end == before_natedit["rules"], info
    assert r.total_foreign == 0, info


@DATAPATHS
def test_two_calls_one_control_connection(gateway: Gateway) -> None:
    """(c) Two pptp-linux calls sharing one call manager, so one control connection,
    the case the kernel helper cannot do (both calls get the masqueraded TCP port as
    public Call ID). pptpd allows one call per control connection, so the server is
    the harness's PAC, which allows several. Both calls must work."""
    r = scenarios.two_calls_one_control(gateway, server="pac")
    assert_clean_exit(r)
    info = r.describe()
    assert r.outcome["control_connections"] == 1, info
    assert r.outcome["call_manager_count"] == 1, info
    assert r.outcome["first_call_connected"] and r.outcome["second_call_connected"], info
    assert r.outcome["distinct_public_call_ids"], info
    assert all(c.clean for c in r.calls.values()), info
    assert r.total_foreign == 0, info
    mapped = events(r, "call_mapped")
    assert len({e["public_call_id"] for e in mapped}) == 2, info
    assert {int(e["client_call_id"], 0) for e in mapped} == {0x1234, 0x1235}, info
