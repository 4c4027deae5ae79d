"""natedit.rules: install/remove in a namespace of our own."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from natedit import host
from natedit.core.policy import Policy
from natedit.rules import (
    Flavour,
    Owned,
    RulesError,
    build_ruleset,
    check_no_pptp_helper,
    cleanup,
    install,
    remove,
    render_iptables,
)
from tests.scratch_ns import Namespace, host_commands_in, require_scratch_ns, scratch_namespaces
from tests.unit.test_rules import INSIDE, PASS, POLICY

# -- in a namespace of our own ------------------------------------------------------------

OPERATOR_RULES = """\
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 53 -j CT --notrack
COMMIT
*mangle
:FORWARD ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.0.0.0/24 -o eth0 -j MASQUERADE
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""


@pytest.fixture
def gw(monkeypatch: pytest.MonkeyPatch) -> Iterator[Namespace]:
    require_scratch_ns()
    with scratch_namespaces("rules") as (ns,), host_commands_in(ns, monkeypatch):
        yield ns


def _ours(saved: str) -> list[str]:
    return [ln for ln in saved.splitlines() if "NATEDIT-" in ln]


def _expected_saved_lines(rs_text: str) -> list[str]:
    """What iptables-save prints for our rules: -I X 1 becomes -A X."""
    lines = [ln for ln in rs_text.splitlines() if "NATEDIT-" in ln and not ln.startswith(":")]
    return sorted(
        ln.replace(" 1 -j NATEDIT-", " -j NATEDIT-").replace("-I ", "-A ") for ln in lines
    )


@pytest.mark.netns
@pytest.mark.parametrize("operator", [False, True], ids=["empty", "operator-rules"])
def test_install_then_remove_restores_the_ruleset_exactly(gw: Namespace, operator: bool) -> None:
    if operator:
        gw.run(["iptables-restore"], stdin=OPERATOR_RULES)
    before, before_nft = gw.iptables_save(), gw.run(["nft", "list", "ruleset"])
    rs = build_ruleset(POLICY)

    installation = install(rs, Flavour.IPTABLES)
    saved = gw.iptables_save()
    assert sorted(ln for ln in _ours(saved) if ln.startswith("-A")) == _expected_saved_lines(
        render_iptables(rs)
    )
    # Our jumps come first in each built-in chain, before the operator's rules.
    for table in ("raw", "mangle"):
        chains = gw.run(["iptables-save", "-t", table]).splitlines()
        firsts = {ln.split()[1]: ln for ln in reversed(chains) if ln.startswith("-A ")}
        for hook in (h for h in rs.hooks if h.table == table):
            assert firsts[hook.chain] == f"-A {hook.chain} -j {hook.own_chain}"
    # ... and table ip natedit holds the ownership sets and the chains that claim GRE.
    native = gw.run(["nft", "list", "table", "ip", "natedit"])
    for name in ("claim_prerouting", "settle_prerouting", "claim_forward", "settle_forward",
                 "guard_postrouting", "set own_in", "set own_out"):
        assert name in native

    remove(installation)
    assert gw.iptables_save() == before
    assert gw.run(["nft", "list", "ruleset"]) == before_nft


@pytest.mark.netns
def test_crash_then_restart_then_remove_is_clean(gw: Namespace) -> None:
    gw.run(["iptables-restore"], stdin=OPERATOR_RULES)
    before = gw.iptables_save()
    install(build_ruleset(POLICY), Flavour.IPTABLES)  # the run that "crashed"
    moved = Policy(public_address=IPv4Address("203.0.113.9"), inside_networks=INSIDE)
    rs = build_ruleset(moved)  # the restart has another public address
    installation = install(rs, Flavour.IPTABLES)

    saved = gw.iptables_save()
    assert "198.51.100.1" not in saved
    assert sorted(ln for ln in _ours(saved) if ln.startswith("-A")) == _expected_saved_lines(
        render_iptables(rs)
    )
    remove(installation)
    assert gw.iptables_save() == before
    remove(installation)  # idempotent
    assert gw.iptables_save() == before


NFTLIB_SCRIPT = """
from natedit.nftlib import Nft, NftError
nft = Nft()
nft.run("add element ip natedit own_out { 10.0.0.3 . 198.51.100.2 . 7 }\\n"
        "delete element ip natedit own_in { 198.51.100.1 . 198.51.100.2 . 4660 }\\n")
try:
    nft.run("delete element ip natedit own_in { 198.51.100.1 . 198.51.100.2 . 1 }\\n")
except NftError as exc:
    assert str(exc).startswith("nft: "), exc
else:
    raise AssertionError("a missing element was deleted")
nft.close()
"""


@pytest.mark.netns
def test_owned_keys_are_installed_and_updated_in_process(gw: Namespace) -> None:
    """install() puts the keys it is given in the sets; libnftables (natedit.nftlib, the
    worker's own process) adds and deletes elements; remove() takes the table away."""
    owned = Owned(("198.51.100.1 . 198.51.100.2 . 4660",), ("10.0.0.2 . 198.51.100.2 . 128",))
    installation = install(build_ruleset(POLICY), Flavour.IPTABLES, owned)
    assert "elements = { 198.51.100.1 . 198.51.100.2 . 0x1234 }" in gw.run(
        ["nft", "list", "set", "ip", "natedit", "own_in"])
    gw.run([sys.executable, "-c", NFTLIB_SCRIPT])
    own_out = gw.run(["nft", "list", "set", "ip", "natedit", "own_out"])
    assert "10.0.0.3 . 198.51.100.2 . 0x7" in own_out  # (nft prints the Call ID in hex)
    assert "10.0.0.2 . 198.51.100.2 . 0x80" in own_out
    assert "elements" not in gw.run(["nft", "list", "set", "ip", "natedit", "own_in"])
    remove(installation)
    assert gw.run(["nft", "list", "ruleset"]) == ""


@pytest.mark.netns
def test_crash_in_an_empty_namespace_leaves_no_tables_behind(gw: Namespace) -> None:
    install(build_ruleset(POLICY), Flavour.IPTABLES)
    installation = install(build_ruleset(POLICY), Flavour.IPTABLES)
    remove(installation)
    assert gw.iptables_save() == ""
    assert gw.run(["nft", "list", "ruleset"]) == ""


@pytest.mark.netns
def test_cleanup_without_leftovers_touches_nothing(gw: Namespace) -> None:
    # An operator's empty base chain and empty table: not natedit's, so not pruned.
    gw.run(["iptables", "-t", "mangle", "-P", "POSTROUTING", "ACCEPT"])
    gw.run(["nft", "add", "table", "ip", "raw"])
    before = gw.run(["nft", "list", "ruleset"])
    cleanup()
    assert gw.run(["nft", "list", "ruleset"]) == before


@pytest.mark.netns
def test_pptp_helper_rule_is_detected(gw: Namespace) -> None:
    check_no_pptp_helper(INSIDE)
    gw.run(["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "1723",
            "-j", "CT", "--helper", "pptp"])  # fmt: skip
    with pytest.raises(RulesError, match=r"^the kernel PPTP helper is attached to TCP 1723"):
        check_no_pptp_helper(INSIDE)


@pytest.mark.netns
def test_nft_flavour_installs_exactly_or_says_why_not(gw: Namespace) -> None:
    gw.run(["iptables-restore"], stdin=OPERATOR_RULES)
    before = gw.run(["nft", "list", "ruleset"])
    rs = build_ruleset(POLICY)
    probe = "table ip natedit_probe { chain c { queue num 9; }; }\ndelete table ip natedit_probe\n"
    try:
        host.run(["nft", "-c", "-f", "-"], stdin=probe)
    except host.HostError:
        with pytest.raises(RulesError, match=r"CONFIG_NFT_QUEUE"):
            install(rs, Flavour.NFT)
        assert gw.run(["nft", "list", "ruleset"]) == before
        return
    installation = install(rs, Flavour.NFT)
    assert "queue num 1724" in gw.run(["nft", "list", "table", "ip", "natedit"])
    remove(installation)
    assert gw.run(["nft", "list", "ruleset"]) == before


@pytest.mark.netns
def test_on_worker_down_pass_installs_queue_bypass_exactly_and_removes_cleanly(
    gw: Namespace,
) -> None:
    before = gw.iptables_save()
    rs = build_ruleset(PASS)
    installation = install(rs, Flavour.IPTABLES)
    saved = gw.iptables_save()
    ours = sorted(ln for ln in _ours(saved) if ln.startswith("-A"))
    assert ours == _expected_saved_lines(render_iptables(rs))
    # TCP 1723 out and in, of the inside clients and of the gateway's own client
    assert len([ln for ln in ours if ln.endswith("--queue-bypass")]) == 4
    remove(installation)
    assert gw.iptables_save() == before


OWNERSHIP_SCRIPT = """
from natedit.core.wire import MessageType
from natedit.nftset import SetElements, SetError, key
from natedit.owned import Ownership
from tests.pptp_flows import IN, OUT, Conversation, make_translator, msg
tr = make_translator()
own = Ownership(tr)
own.start()
conv = Conversation(tr, "10.0.0.11")
conv.open()
own.note(conv.send(OUT, msg(MessageType.OUTGOING_CALL_REQUEST, call_id=0x1234)).events)
[(public, server, public_id)] = list(tr.table.by_public)
reply = msg(MessageType.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=public_id)
own.note(conv.send(IN, reply).events)
own.flush()
assert own.transactions == 1, own.transactions
print(public_id)
sets = SetElements("natedit")
try:  # a batch the kernel refuses changes nothing
    sets.apply([(True, "own_in", [key(public, server, (1).to_bytes(2, "big"))]),
                (False, "own_in", [key(public, server, (2).to_bytes(2, "big"))])])
except SetError as exc:
    assert "No such file" in str(exc), exc
else:
    raise AssertionError("refused batch applied")
"""


@pytest.mark.netns
def test_ownership_sets_follow_the_call_table_through_netlink(gw: Namespace) -> None:
    """natedit.owned's default transport (nf_tables netlink batches, natedit.nftset): a
    real call's keys land in the real sets, in the spelling nft prints; a refused batch
    applies nothing."""
    installation = install(build_ruleset(POLICY), Flavour.IPTABLES)
    public_id = int(gw.run([sys.executable, "-c", OWNERSHIP_SCRIPT]).strip())
    table = gw.run(["nft", "list", "table", "ip", "natedit"])
    assert f"elements = {{ 198.51.100.1 . 198.51.100.2 . {public_id:#x} }}" in table, table
    assert "elements = { 10.0.0.11 . 198.51.100.2 . 0x80 }" in table, table
    assert "elements = { 198.51.100.2 . 0x80 }" in table, table
    assert "elements = { 198.51.100.2 . 198.51.100.1 }" in table, table  # own_peer
    assert table.count("elements = {") == 5  # inside, and the four sets: nothing else
    remove(installation)
