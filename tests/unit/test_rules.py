"""natedit.rules: rendering (pure); tests/netns/test_rules_netns.py installs and removes."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from natedit.core.policy import Policy, WorkerDown
from natedit.rules import (
    Hook,
    NftChains,
    Owned,
    RulesError,
    build_ruleset,
    bypasses,
    iptables_blocks,
    iptables_removal,
    nft_pptp_helpers,
    nft_prune,
    pptp_helper_rules,
    render_iptables,
    render_native,
    render_nft,
)

PUBLIC = IPv4Address("198.51.100.1")
INSIDE = (IPv4Network("10.0.0.0/24"),)
POLICY = Policy(public_address=PUBLIC, inside_networks=INSIDE)
U32 = '-m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10&0x7=0x1"'

# The whole rendering for the smallest useful policy, as iptables-restore reads it.
MARKED = "-p gre -m mark --mark 0x10000000/0x10000000"
GATEWAY_OUT_WHY = ("control, the gateway's own client to a server: its calls get public "
                   "Call IDs from the same pools")
GATEWAY_WHY = ("control, a server to the gateway's own client (not to a pptpd on the "
               "gateway: destination port 1723 is never queued here)")
EXPECTED_IPTABLES = f"""\
# natedit rules: iptables-restore --noflush < this
# public address 198.51.100.1, inside 10.0.0.0/24
# no --queue-bypass: with no worker bound, queued PPTP packets are dropped
# needs table ip natedit (natedit rules --flavour iptables --native) loaded first
*raw
:NATEDIT-PREROUTING - [0:0]
-I PREROUTING 1 -j NATEDIT-PREROUTING
# inbound GRE of a call, before routing: the private destination is routed
-A NATEDIT-PREROUTING {MARKED} -j NFQUEUE --queue-num 1724
COMMIT
*mangle
:NATEDIT-FORWARD - [0:0]
:NATEDIT-FORWARD-OUT - [0:0]
:NATEDIT-FORWARD-IN - [0:0]
:NATEDIT-OUTPUT - [0:0]
:NATEDIT-OUTPUT-OUT - [0:0]
:NATEDIT-INPUT - [0:0]
:NATEDIT-INPUT-IN - [0:0]
-I FORWARD 1 -j NATEDIT-FORWARD
-I OUTPUT 1 -j NATEDIT-OUTPUT
-I INPUT 1 -j NATEDIT-INPUT
# control, client to server: private source, before the kernel's SNAT
-A NATEDIT-FORWARD -p tcp -m tcp --dport 1723 -j NATEDIT-FORWARD-OUT
# control, server to client: private destination, after the kernel un-NATs
-A NATEDIT-FORWARD -p tcp -m tcp --sport 1723 -j NATEDIT-FORWARD-IN
# outbound GRE of a call: natedit writes the public source
-A NATEDIT-FORWARD {MARKED} -j NFQUEUE --queue-num 1723
-A NATEDIT-FORWARD-OUT -d 10.0.0.0/24 -j RETURN
-A NATEDIT-FORWARD-OUT -s 10.0.0.0/24 -j NFQUEUE --queue-num 1723
-A NATEDIT-FORWARD-IN -s 10.0.0.0/24 -j RETURN
-A NATEDIT-FORWARD-IN -d 10.0.0.0/24 -j NFQUEUE --queue-num 1724
# {GATEWAY_OUT_WHY}
-A NATEDIT-OUTPUT -p tcp -m tcp --dport 1723 -j NATEDIT-OUTPUT-OUT
-A NATEDIT-OUTPUT-OUT -o lo -j RETURN
-A NATEDIT-OUTPUT-OUT -d 10.0.0.0/24 -j RETURN
-A NATEDIT-OUTPUT-OUT -j NFQUEUE --queue-num 1723
# {GATEWAY_WHY}
-A NATEDIT-INPUT -p tcp -m tcp --sport 1723 -j NATEDIT-INPUT-IN
-A NATEDIT-INPUT-IN -i lo -j RETURN
-A NATEDIT-INPUT-IN -s 10.0.0.0/24 -j RETURN
-A NATEDIT-INPUT-IN -j NFQUEUE --queue-num 1724
COMMIT
"""

GRE = "ip protocol gre @th,0,32 & 0xe007ffff == 0x2001880b"
OWN_IN = f"{GRE} ip daddr . ip saddr . @th,48,16 @own_in"
OWN_OUT = f"{GRE} ip saddr . ip daddr . @th,48,16 @own_out"
TO_SERVER = f"{GRE} ip daddr . @th,48,16 @own_server ip saddr @inside"
PEER = f"{GRE} ip saddr . ip daddr @own_peer"
CLAIMED = "ip protocol gre meta mark & 0x10000000 == 0x10000000"
SET_MARK = "meta mark set meta mark | 0x10000000"
CLEAR_MARK = "meta mark set meta mark & 0xefffffff"


def test_iptables_rendering_is_exact() -> None:
    assert render_iptables(build_ruleset(POLICY)) == EXPECTED_IPTABLES


def test_no_rule_names_the_public_address() -> None:
    """Inbound GRE is claimed by set own_in alone (its keys carry the public address):
    several public addresses need no other rules."""
    rs = build_ruleset(POLICY)
    for text in (render_iptables(rs), render_native(rs), render_nft(rs)):
        body = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in body if str(PUBLIC) in ln]


def test_native_table_claims_only_what_the_sets_hold() -> None:
    """Chains, hooks and priorities of table ip natedit (iptables flavour), and each rule:
    only GRE whose key is in a set is exempted from conntrack, marked or dropped."""
    text = render_native(build_ruleset(POLICY))
    chains = re.findall(r"chain (\w+) \{\n\t\ttype filter hook (\w+) priority (-?\d+);", text)
    assert chains == [
        ("claim_prerouting", "prerouting", "-302"),  # before raw (-300): the queue rule
        ("settle_prerouting", "prerouting", "-299"),  # before conntrack (-200)
        ("claim_forward", "forward", "-151"),  # before mangle (-150): the queue rule
        ("settle_forward", "forward", "-149"),
        ("guard_postrouting", "postrouting", "101"),  # after the kernel's SNAT (100)
    ]
    statements = [ln.strip().split(" comment ")[0] for ln in text.splitlines()
                  if " comment " in ln]
    assert statements == [
        f"{OWN_IN} notrack {SET_MARK}",
        f"{PEER} notrack {SET_MARK}",  # a call's server, unknown Call ID: no_call, no ICMP
        f"{OWN_OUT} notrack",
        f"{CLAIMED} {CLEAR_MARK}",
        f"{TO_SERVER} {SET_MARK}",  # any inside source: the core drops a spoofed one
        f"{CLAIMED} {CLEAR_MARK}",
        f"{OWN_OUT} ip saddr @inside drop",  # not the gateway's own client's (public source)
    ]
    assert "set own_server {\n\t\ttypeof ip daddr . @th,48,16\n\t}" in text
    assert "set own_peer {\n\t\ttypeof ip saddr . ip daddr\n\t}" in text
    assert "set own_in {\n\t\ttypeof ip daddr . ip saddr . @th,48,16\n\t}" in text
    assert "set own_out {\n\t\ttypeof ip saddr . ip daddr . @th,48,16\n\t}" in text
    assert " queue num " not in text  # the queue rules are iptables rules in this flavour


def test_native_table_carries_the_owned_keys() -> None:
    owned = Owned(("198.51.100.1 . 198.51.100.2 . 4660",),
                  ("10.0.0.2 . 198.51.100.2 . 7", "10.0.0.3 . 198.51.100.2 . 8"),
                  ("198.51.100.2 . 7", "198.51.100.2 . 8"), ("198.51.100.2 . 198.51.100.1",))
    text = render_native(build_ruleset(POLICY), owned)
    assert "\t\telements = { 198.51.100.1 . 198.51.100.2 . 4660 }" in text
    assert "\t\telements = { 10.0.0.2 . 198.51.100.2 . 7, 10.0.0.3 . 198.51.100.2 . 8 }" in text
    assert "\t\telements = { 198.51.100.2 . 7, 198.51.100.2 . 8 }" in text
    assert ("\tset own_peer {\n\t\ttypeof ip saddr . ip daddr\n"
            "\t\telements = { 198.51.100.2 . 198.51.100.1 }") in text
    assert render_nft(build_ruleset(POLICY), owned).count("elements = {") == 5


def test_no_queue_bypass_anywhere() -> None:
    rs = build_ruleset(Policy(public_address=PUBLIC))
    for text in (render_iptables(rs), render_nft(rs)):
        rules = [ln for ln in text.splitlines() if "queue" in ln and not ln.startswith("#")]
        assert rules
        assert not [ln for ln in rules if "bypass" in ln]


PASS = Policy(public_address=PUBLIC, inside_networks=INSIDE, on_worker_down=WorkerDown.PASS)


def test_on_worker_down_drop_is_the_default_and_bypasses_nothing() -> None:
    assert Policy().on_worker_down is WorkerDown.DROP
    assert not bypasses(build_ruleset(POLICY))


def test_on_worker_down_pass_bypasses_tcp_1723_only_iptables() -> None:
    text = render_iptables(build_ruleset(PASS))
    rules = [ln for ln in text.splitlines() if not ln.startswith("#")]
    queued = [ln for ln in rules if "NFQUEUE" in ln]
    bypassed = [ln for ln in queued if ln.endswith(" --queue-bypass")]
    assert bypassed == [
        "-A NATEDIT-FORWARD-OUT -s 10.0.0.0/24 -j NFQUEUE --queue-num 1723 --queue-bypass",
        "-A NATEDIT-FORWARD-IN -d 10.0.0.0/24 -j NFQUEUE --queue-num 1724 --queue-bypass",
        "-A NATEDIT-OUTPUT-OUT -j NFQUEUE --queue-num 1723 --queue-bypass",
        "-A NATEDIT-INPUT-IN -j NFQUEUE --queue-num 1724 --queue-bypass",
    ]
    # the GRE of natedit's own calls stays fail closed: its Call IDs are translated
    assert all(MARKED in ln for ln in queued if ln not in bypassed)
    # everything but the bypass and the header is today's rendering
    drop = render_iptables(build_ruleset(POLICY)).splitlines()
    changed = [ln for ln in text.splitlines() if ln not in drop]
    assert [ln for ln in changed if not ln.startswith("#")] == bypassed
    assert [ln for ln in drop if ln not in text.splitlines()
            and not ln.startswith("#")] == [b.removesuffix(" --queue-bypass") for b in bypassed]
    assert "on_worker_down: pass" in text.splitlines()[2]
    # the native table is the same in both modes
    assert render_native(build_ruleset(PASS)) == render_native(build_ruleset(POLICY))


def test_on_worker_down_pass_bypasses_tcp_1723_only_nft() -> None:
    text = render_nft(build_ruleset(PASS))
    queued = [ln.strip() for ln in text.splitlines() if " queue num " in ln]
    assert [ln for ln in queued if "bypass" in ln] == [
        f"tcp sport 1723 {GATEWAY_IN_FLOW} queue num 1724 bypass comment "
        '"control, a server to the gateway\'s own client (not to a pptpd on the gateway: '
        'destination port 1723 is never queued here)"',
        f"tcp dport 1723 {OUT_FLOW} queue num 1723 bypass comment "
        '"control, client to server: private source, before the kernel\'s SNAT"',
        f"tcp sport 1723 {IN_FLOW} queue num 1724 bypass comment "
        '"control, server to client: private destination, after the kernel un-NATs"',
        f"tcp dport 1723 {GATEWAY_OUT_FLOW} queue num 1723 bypass comment "
        '"control, the gateway\'s own client to a server: its calls get public Call IDs '
        'from the same pools"',
    ]
    assert all(ln.startswith(CLAIMED) for ln in queued if "bypass" not in ln)
    assert "on_worker_down: pass" in text.splitlines()[1]
    drop = render_nft(build_ruleset(POLICY))
    body = [ln for ln in text.replace(" bypass comment", " comment").splitlines()
            if not ln.startswith("#")]
    assert body == [ln for ln in drop.splitlines() if not ln.startswith("#")]


OUT_FLOW = "ip saddr @inside ip daddr != @inside"
IN_FLOW = "ip daddr @inside ip saddr != @inside"
GATEWAY_OUT_FLOW = 'oifname != "lo" ip daddr != @inside'
GATEWAY_IN_FLOW = 'iifname != "lo" ip saddr != @inside'


def test_inside_networks_are_collapsed_and_each_gets_a_return_and_a_target() -> None:
    policy = Policy(
        public_address=PUBLIC,
        inside_networks=(
            IPv4Network("10.0.0.0/25"),
            IPv4Network("10.0.0.128/25"),
            IPv4Network("10.0.0.0/24"),
            IPv4Network("192.168.7.0/24"),
        ),
    )
    mangle = iptables_blocks(build_ruleset(policy))["mangle"]
    assert [ln for ln in mangle if ln.startswith("-A NATEDIT-FORWARD-OUT")] == [
        "-A NATEDIT-FORWARD-OUT -d 10.0.0.0/24 -j RETURN",
        "-A NATEDIT-FORWARD-OUT -d 192.168.7.0/24 -j RETURN",
        "-A NATEDIT-FORWARD-OUT -s 10.0.0.0/24 -j NFQUEUE --queue-num 1723",
        "-A NATEDIT-FORWARD-OUT -s 192.168.7.0/24 -j NFQUEUE --queue-num 1723",
    ]


def test_queue_numbers_come_from_the_policy() -> None:
    policy = Policy(
        public_address=PUBLIC, inside_networks=INSIDE, queue_outbound=7, queue_inbound=0
    )
    text = render_iptables(build_ruleset(policy))
    assert "-A NATEDIT-FORWARD-OUT -s 10.0.0.0/24 -j NFQUEUE --queue-num 7" in text
    assert "-A NATEDIT-FORWARD-IN -d 10.0.0.0/24 -j NFQUEUE --queue-num 0" in text
    assert f"-A NATEDIT-PREROUTING {MARKED} -j NFQUEUE --queue-num 0" in text
    assert f"-A NATEDIT-FORWARD {MARKED} -j NFQUEUE --queue-num 7" in text


def test_unresolved_public_address_is_refused() -> None:
    with pytest.raises(RulesError, match=r"^public_address is not resolved"):
        build_ruleset(Policy())


def test_public_address_inside_is_refused() -> None:
    policy = Policy(public_address=IPv4Address("10.0.0.1"), inside_networks=INSIDE)
    with pytest.raises(RulesError, match=r"^public_address 10.0.0.1 is inside inside_networks$"):
        build_ruleset(policy)


def test_several_public_addresses_need_no_other_rules() -> None:
    """GRE to every public address is natedit's when a call's key (which carries the
    call's public address) is in the sets: the rules are those of one address, only the
    headers list them all."""
    other = IPv4Address("198.51.100.3")
    policy = Policy(public_address=PUBLIC, other_public_addresses=(other,),
                    inside_networks=INSIDE)
    rs = build_ruleset(policy)
    assert rs.public_addresses == (PUBLIC, other)
    text = render_iptables(rs)
    assert "# public addresses 198.51.100.1, 198.51.100.3, inside 10.0.0.0/24" in text
    one = build_ruleset(POLICY)
    assert [ln for ln in text.splitlines() if "198.51.100.3" not in ln] == [
        ln for ln in render_iptables(one).splitlines() if not ln.startswith("# public address")]
    assert render_native(rs) == render_native(one)
    assert render_nft(rs) == render_nft(one)
    for body in (render_iptables(rs), render_native(rs), render_nft(rs)):
        assert not [ln for ln in body.splitlines() if not ln.lstrip().startswith("#")
                    and ("198.51.100.3" in ln or "198.51.100.1" in ln)]
    with pytest.raises(RulesError, match=r"10\.0\.0\.9 is inside"):
        build_ruleset(Policy(public_address=PUBLIC, inside_networks=INSIDE,
                             other_public_addresses=(IPv4Address("10.0.0.9"),)))


def test_nft_rendering() -> None:
    text = render_nft(build_ruleset(POLICY))
    lines = [ln.strip() for ln in text.splitlines()]
    # The create-delete-create idiom: one atomic replace, whether or not it existed.
    assert lines[2:5] == ["table ip natedit", "delete table ip natedit", "table ip natedit {"]
    assert "elements = { 10.0.0.0/24 }" in lines
    assert "type filter hook prerouting priority raw; policy accept;" in lines
    statements = [ln.split(" comment ")[0] for ln in lines if " comment " in ln]
    assert statements == [
        f"{OWN_IN} notrack {SET_MARK}",  # claim_prerouting -302
        f"{PEER} notrack {SET_MARK}",
        f"{OWN_OUT} notrack",
        f"{CLAIMED} queue num 1724",  # raw_prerouting -300
        f"{CLAIMED} {CLEAR_MARK}",  # settle_prerouting -299
        # mangle_input: the server's replies to the gateway's own client
        f"tcp sport 1723 {GATEWAY_IN_FLOW} queue num 1724",
        f"{TO_SERVER} {SET_MARK}",  # claim_forward -151
        "tcp dport 1723 ip saddr @inside ip daddr != @inside queue num 1723",  # mangle_forward
        "tcp sport 1723 ip daddr @inside ip saddr != @inside queue num 1724",
        f"{CLAIMED} queue num 1723",
        f"{CLAIMED} {CLEAR_MARK}",  # settle_forward -149
        # mangle_output: the gateway's own client's requests
        f"tcp dport 1723 {GATEWAY_OUT_FLOW} queue num 1723",
        f"{OWN_OUT} ip saddr @inside drop",  # guard_postrouting 101
    ]


# -- removal planning (pure) ----------------------------------------------------------

SAVED_WITH_LEFTOVERS = f"""\
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 21 01:02:37 2026
*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:NATEDIT-FORWARD - [0:0]
:NATEDIT-FORWARD-OUT - [0:0]
:OPERATOR - [0:0]
-A PREROUTING -j OPERATOR
-A FORWARD -j NATEDIT-FORWARD
-A FORWARD -p tcp -j ACCEPT
-A FORWARD -j NATEDIT-FORWARD
-A OPERATOR -p gre {U32} -g NATEDIT-FORWARD-OUT
-A NATEDIT-FORWARD -p tcp -m tcp --dport 1723 -j NATEDIT-FORWARD-OUT
-A NATEDIT-FORWARD-OUT -s 10.0.0.0/24 -j NFQUEUE --queue-num 1723
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o eth0 -j MASQUERADE
COMMIT
"""


def test_removal_deletes_every_reference_then_flushes_then_deletes() -> None:
    assert iptables_removal(SAVED_WITH_LEFTOVERS) == {
        "mangle": [
            "-D FORWARD -j NATEDIT-FORWARD",
            "-D FORWARD -j NATEDIT-FORWARD",
            f"-D OPERATOR -p gre {U32} -g NATEDIT-FORWARD-OUT",
            "-F NATEDIT-FORWARD",
            "-F NATEDIT-FORWARD-OUT",
            "-X NATEDIT-FORWARD",
            "-X NATEDIT-FORWARD-OUT",
        ]
    }


def test_removal_of_a_clean_ruleset_is_nothing() -> None:
    clean = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"
    assert iptables_removal(clean) == {}
    assert iptables_removal("") == {}


# -- the kernel PPTP helper (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "covers"),
    [
        ("-A PREROUTING -p tcp -m tcp --dport 1723 -j CT --helper pptp", True),
        ("-A PREROUTING -p tcp -j CT --helper pptp", True),
        ("-A PREROUTING -s 10.0.0.0/8 -p tcp -m tcp --dport 1723 -j CT --helper pptp", True),
        ("-A PREROUTING -p tcp -m multiport --dports 1700:1800 -j CT --helper pptp", True),
        ("-A PREROUTING -p tcp -m tcp ! --dport 21 -j CT --helper pptp", True),
        ("-A PREROUTING -p tcp -m multiport --dports 21,1000: -j CT --helper pptp", True),
        ("-A PREROUTING -p tcp -m multiport --dports 21,1724: -j CT --helper pptp", False),
        ("-A PREROUTING -p tcp -m tcp --dport 21 -j CT --helper pptp", False),
        ("-A PREROUTING -p tcp -m tcp ! --dport 1723 -j CT --helper pptp", False),
        ("-A PREROUTING -s 192.168.0.0/16 -p tcp -m tcp --dport 1723 -j CT --helper pptp", False),
        ("-A PREROUTING -p tcp -m tcp --dport 21 -j CT --helper ftp", False),
        ("-A PREROUTING -p tcp -m tcp --dport 1723 -j CT --helper ftp", False),
    ],
)
def test_pptp_helper_rules(rule: str, covers: bool) -> None:
    saved = f"*raw\n:PREROUTING ACCEPT [0:0]\n{rule}\nCOMMIT\n"
    assert pptp_helper_rules(saved, INSIDE) == ([f"raw: {rule}"] if covers else [])


def test_pptp_helper_outside_the_raw_table_is_not_a_helper_rule() -> None:
    saved = "*mangle\n-A PREROUTING -p tcp -j CT --helper pptp\nCOMMIT\n"
    assert pptp_helper_rules(saved, INSIDE) == []


def test_native_nft_pptp_helper_objects() -> None:
    objects: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": "fw", "handle": 1}},
        {"ct helper": {"family": "inet", "table": "fw", "name": "p", "type": "pptp"}},
        {"ct helper": {"family": "inet", "table": "fw", "name": "f", "type": "ftp"}},
    ]
    assert nft_pptp_helpers(objects) == ["nft: ct helper inet fw p (type pptp)"]


# -- pruning what iptables-nft created (pure) -----------------------------------------------


def _chain(table: str, name: str, hook: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"family": "ip", "table": table, "name": name}
    if hook:
        body |= {"type": "filter", "hook": hook, "prio": -150, "policy": "accept"}
    return {"chain": body}


def _rule(table: str, chain: str) -> dict[str, Any]:
    return {"rule": {"family": "ip", "table": table, "chain": chain, "expr": []}}


AFTER_REMOVAL: list[dict[str, Any]] = [
    {"metainfo": {"version": "1.0.6"}},
    {"table": {"family": "ip", "name": "raw"}},
    _chain("raw", "PREROUTING", "prerouting"),
    {"table": {"family": "ip", "name": "mangle"}},
    _chain("mangle", "PREROUTING", "prerouting"),
    _chain("mangle", "FORWARD", "forward"),
    _chain("mangle", "POSTROUTING", "postrouting"),
    _rule("mangle", "FORWARD"),
]


def test_prune_with_unknown_past_deletes_every_empty_base_chain_and_table() -> None:
    assert nft_prune(AFTER_REMOVAL, None, tuple(Hook)) == (
        "delete chain ip raw PREROUTING\n"
        "delete chain ip mangle PREROUTING\n"
        "delete chain ip mangle POSTROUTING\n"
        "delete table ip raw\n"
    )


def test_prune_keeps_what_was_there_before() -> None:
    before = NftChains(frozenset({"raw"}), frozenset({("raw", "PREROUTING")}))
    assert nft_prune(AFTER_REMOVAL, before, tuple(Hook)) == (
        "delete chain ip mangle PREROUTING\ndelete chain ip mangle POSTROUTING\n"
    )


def test_prune_keeps_a_base_chain_with_a_drop_policy() -> None:
    objects = [
        {"table": {"family": "ip", "name": "raw"}},
        {"chain": _chain("raw", "PREROUTING", "prerouting")["chain"] | {"policy": "drop"}},
    ]
    assert nft_prune(objects, None, tuple(Hook)) == ""


def test_prune_only_looks_at_natedit_hooks() -> None:
    objects = [{"table": {"family": "ip", "name": "raw"}}, _chain("raw", "OUTPUT", "output")]
    assert nft_prune(objects, None, tuple(Hook)) == ""


def test_every_comment_fits_nft() -> None:
    """nft refuses a comment longer than 128 characters (and so the whole table)."""
    for policy in (POLICY, PASS):
        rs = build_ruleset(policy)
        for text in (render_native(rs), render_nft(rs)):
            comments = re.findall(r'comment "([^"]*)"', text)
            assert comments and max(map(len, comments)) <= 128
