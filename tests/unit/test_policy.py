"""The policy file: every field from YAML, every error with its place and wording, and
reloads into a running core (live calls kept, new ones under the new policy).

Core-level only: no root, no namespaces (tests/netns/test_e2e_policy.py runs the real worker).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import textwrap
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from natedit import (
    Action,
    CallRefused,
    ConnectionRefused,
    Direction,
    Event,
    Policy,
    PolicyError,
    Verdict,
    cli,
    logs,
    reload,
    worker,
)
from natedit.core.errors import Refusal
from natedit.core.policy import (
    Allocation,
    Datapath,
    DisconnectRule,
    LogFormat,
    MalformedAction,
    WorkerDown,
    acl_allows,
)
from natedit.core.wire import TCP_SYN, MessageType, build_tcp
from natedit.policyfile import FIELDS, SCHEMA, dump_policy, load_policy, parse_policy, read_policy
from natedit.status import PolicyStatus
from tests.pptp_flows import (
    PUBLIC,
    SERVER,
    Conversation,
    establish,
    forward,
    gre_in,
    gre_out,
    make_translator,
    msg,
    payload_of,
    run_timers,
    u16,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "policy.yaml"
IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
MT = MessageType
OUT = Direction.OUTBOUND
IN = Direction.INBOUND

# -- every field -----------------------------------------------------------------------------

EVERY_FIELD = """\
public_address: [203.0.113.7, 203.0.113.9]
public_interface: null
inside_networks: [10.1.0.0/16, 192.168.7.0/24]
queues:
  outbound: 7
  inbound: 8
call_ids:
  first: 40000
  last: 40999
  allocation: sequential
  node: 2
  nodes: 2
limits:
  max_calls_per_client: 3
  max_calls: 500
  max_control_connections: 99
  new_calls_per_second: 2.5
  new_calls_burst: 4
timeouts:
  request: 30
  call_idle: 120.5
  control_idle: 600
acl:
  clients:
    allow: [10.1.0.0/16, 192.168.7.9]
    deny: [10.1.66.0/24]
  servers:
    allow: [198.51.100.0/24]
    deny: [198.51.100.66/32]
refuse: drop
malformed: pass
disconnect_rule: rfc
datapath: kernel
on_worker_down: pass
metrics:
  listen: "[::1]:9100"
  call_series: 0
logging:
  level: debug
  format: json
"""

EVERY_FIELD_POLICY = Policy(
    public_address=IP("203.0.113.7"),
    other_public_addresses=(IP("203.0.113.9"),),
    public_interface=None,
    inside_networks=(NET("10.1.0.0/16"), NET("192.168.7.0/24")),
    queue_outbound=7,
    queue_inbound=8,
    call_id_first=40000,
    call_id_last=40999,
    allocation=Allocation.SEQUENTIAL,
    call_id_node=2,
    call_id_nodes=2,
    max_calls_per_client=3,
    max_calls=500,
    max_control_connections=99,
    new_calls_per_second=2.5,
    new_calls_burst=4,
    request_timeout=30.0,
    call_idle_timeout=120.5,
    control_idle_timeout=600.0,
    clients_allow=(NET("10.1.0.0/16"), NET("192.168.7.9/32")),
    clients_deny=(NET("10.1.66.0/24"),),
    servers_allow=(NET("198.51.100.0/24"),),
    servers_deny=(NET("198.51.100.66/32"),),
    malformed=MalformedAction.PASS,
    disconnect_rule=DisconnectRule.RFC,
    datapath=Datapath.KERNEL,
    on_worker_down=WorkerDown.PASS,
    metrics_listen="[::1]:9100",
    metrics_call_series=0,
    log_level="debug",
    log_format=LogFormat.JSON,
)


def leaf_paths(text: str) -> set[str]:
    """Dotted paths of the scalar and list values of a YAML document."""
    def walk(node: object, prefix: str) -> set[str]:
        if isinstance(node, dict):
            return set().union(*(walk(v, f"{prefix}{k}.") for k, v in node.items()))
        return {prefix[:-1]}
    return walk(yaml.safe_load(text), "")


def test_every_field_from_yaml() -> None:
    loaded = parse_policy(EVERY_FIELD, "p.yaml")
    assert loaded.policy == EVERY_FIELD_POLICY
    # the document names every key of the schema, so a new field must join this test
    assert leaf_paths(EVERY_FIELD) == {f.path for f in SCHEMA}
    # refuse (one choice, and nothing reads it) is accepted and checked but sets nothing
    assert {f.path for f in SCHEMA if f.retired} == {"refuse"}
    assert {f.path for f in FIELDS} == {f.path for f in SCHEMA} - {"refuse"}
    assert not hasattr(loaded.policy, "refuse")
    assert "refuse" not in dump_policy(loaded.policy)
    # and every attribute differs from its default but public_interface (it excludes
    # public_address)
    same = {f.path for f in FIELDS if getattr(loaded.policy, f.attr) == f.default}
    assert same == {"public_interface"}


def test_several_public_addresses() -> None:
    """A list at public_address: the first is Policy.public_address, the rest follow;
    check-policy's dump says the list, one address stays a scalar."""
    A, B = ipaddress.IPv4Address("198.51.100.1"), ipaddress.IPv4Address("198.51.100.3")
    p = parse_policy("public_address: [198.51.100.1, 198.51.100.3]\n").policy
    assert (p.public_address, p.other_public_addresses, p.public_addresses) == (A, (B,), (A, B))
    assert "public_address: [198.51.100.1, 198.51.100.3]" in dump_policy(p)
    assert parse_policy(dump_policy(p)).policy == p
    one = parse_policy("public_address: [198.51.100.1]\n").policy
    assert one == parse_policy("public_address: 198.51.100.1\n").policy
    assert "public_address: 198.51.100.1\n" in dump_policy(one)
    assert p.with_public_address(A) == p  # (the worker's resolution keeps the others)
    assert Policy().public_addresses == ()


def test_public_interface() -> None:
    p = parse_policy("public_interface: eth0.5\n").policy
    assert (p.public_address, p.public_interface) == (None, "eth0.5")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "null\n",
                                  "limits:\n", "acl:\n  clients:\n"])
def test_empty_documents_and_groups_are_the_defaults(text: str) -> None:
    assert parse_policy(text).policy == Policy()


def test_no_file_is_the_default() -> None:
    assert load_policy(None) == Policy()


@pytest.mark.parametrize("policy", [Policy(), EVERY_FIELD_POLICY], ids=["default", "every"])
def test_dump_round_trips(policy: Policy) -> None:
    text = dump_policy(policy)
    assert parse_policy(text).policy == policy
    assert leaf_paths(text) == {f.path for f in FIELDS}


def test_deploy_example_is_every_field_at_its_default() -> None:
    text = DEPLOY.read_text()
    assert read_policy(DEPLOY).policy == Policy()
    assert leaf_paths(text) == {f.path for f in FIELDS}


def test_readme_names_every_field() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Policy"):]
    section = section[:section.index("\n## ", 1)]
    missing = [f.path for f in FIELDS if f"`{f.path.rsplit('.', 1)[-1]}`" not in section]
    assert not missing


# -- errors: place and wording ---------------------------------------------------------------

ERRORS: list[tuple[str, str, list[str]]] = [
    ("unknown top-level key", "bogus: 1\n",
     ["p.yaml:1: bogus: unknown key; expected one of: public_address, public_interface, "
      "inside_networks, queues, call_ids, limits, timeouts, acl, refuse, malformed, "
      "disconnect_rule, datapath, on_worker_down, metrics, logging"]),
    ("a flat name of the old layout", "queue_inbound: 5\n",
     ["p.yaml:1: queue_inbound: unknown key; did you mean queues.inbound?"]),
    ("a typo in a group", "limits:\n  max_call: 5\n",
     ["p.yaml:2: limits.max_call: unknown key; did you mean limits.max_calls?"]),
    ("unknown key in a group", "timeouts:\n  forever: 1\n",
     ["p.yaml:2: timeouts.forever: unknown key; expected one of: request, call_idle, "
      "control_idle"]),
    ("a number as key", "acl:\n  clients:\n    7: x\n",
     ["p.yaml:3: acl.clients.7: unknown key; expected one of: allow, deny"]),
    ("duplicate key", "limits:\n  max_calls: 5\n  max_calls: 6\n",
     ["p.yaml:3: limits.max_calls: duplicate key (first at line 2)"]),
    ("a word for an integer", "\n\nlimits:\n  max_calls_per_client: many\n",
     ["p.yaml:4: limits.max_calls_per_client: expected an integer from 1 to 65535, found 'many'"]),
    ("a bool for an integer", "limits: {max_calls: true}\n",
     ["p.yaml:1: limits.max_calls: expected an integer from 1 to 65535, found true"]),
    ("a float for an integer", "limits: {new_calls_burst: 1.5}\n",
     ["p.yaml:1: limits.new_calls_burst: expected an integer from 1 to 65535, found 1.5"]),
    ("a quoted number", "queues: {outbound: '5'}\n",
     ["p.yaml:1: queues.outbound: expected an integer from 0 to 65535, found '5'"]),
    ("zero", "limits:\n  max_calls: 0\n",
     ["p.yaml:2: limits.max_calls: expected an integer from 1 to 65535, found 0"]),
    ("queue out of range", "queues:\n  inbound: 70000\n",
     ["p.yaml:2: queues.inbound: expected an integer from 0 to 65535, found 70000"]),
    ("negative Call ID", "call_ids:\n  first: -1\n",
     ["p.yaml:2: call_ids.first: expected an integer from 0 to 65535, found -1"]),
    ("series cap", "metrics:\n  call_series: -5\n",
     ["p.yaml:2: metrics.call_series: expected an integer from 0 to 10000000, found -5"]),
    ("timeout zero", "timeouts:\n  request: 0\n",
     ["p.yaml:2: timeouts.request: expected seconds, more than 0 and at most 604800, "
      "found 0"]),
    ("timeout infinite", "timeouts:\n  call_idle: .inf\n",
     ["p.yaml:2: timeouts.call_idle: expected seconds, more than 0 and at most 604800, "
      "found inf"]),
    ("timeout not a number", "timeouts:\n  control_idle: 5m\n",
     ["p.yaml:2: timeouts.control_idle: expected seconds, more than 0 and at most 604800, "
      "found '5m'"]),
    ("negative rate", "limits:\n  new_calls_per_second: -1\n",
     ["p.yaml:2: limits.new_calls_per_second: expected a number from 0 to 1000000 "
      "(0: no limit), found -1"]),
    ("NaN rate", "limits:\n  new_calls_per_second: .nan\n",
     ["p.yaml:2: limits.new_calls_per_second: expected a number from 0 to 1000000 "
      "(0: no limit), found nan"]),
    ("empty Call ID range", "call_ids:\n  first: 500\n  last: 100\n",
     ["p.yaml:3: call_ids.last: expected at least call_ids.first (500), found 100 "
      "(an empty range)"]),
    ("empty range against a default", "call_ids:\n  first: 9\n  last: 8\n",
     ["p.yaml:3: call_ids.last: expected at least call_ids.first (9), found 8 "
      "(an empty range)"]),
    ("last written first", "call_ids:\n  last: 100\n  first: 500\n",
     ["p.yaml:3: call_ids.first: expected at most call_ids.last (100), found 500 "
      "(an empty range)"]),
    ("same queues", "queues:\n  inbound: 1723\n",
     ["p.yaml:2: queues.inbound: expected a queue number other than queues.outbound "
      "(1723), found 1723"]),
    ("unparsable address", "public_address: 300.1.2.3\n",
     ["p.yaml:1: public_address: expected an IPv4 address, a list of 1 to 64 different "
      "IPv4 addresses, or null, found '300.1.2.3'"]),
    ("an IPv6 address", "public_address: '2001:db8::1'\n",
     ["p.yaml:1: public_address: expected an IPv4 address, a list of 1 to 64 different "
      "IPv4 addresses, or null, found '2001:db8::1'"]),
    ("an empty list of public addresses", "public_address: []\n",
     ["p.yaml:1: public_address: expected an IPv4 address, a list of 1 to 64 different "
      "IPv4 addresses, or null, found a list"]),
    ("a public address twice", "public_address: [198.51.100.1, 198.51.100.1]\n",
     ["p.yaml:1: public_address: expected an IPv4 address, a list of 1 to 64 different "
      "IPv4 addresses, or null, found a list (198.51.100.1 twice)"]),
    ("a bad public address in a list", "public_address: [198.51.100.1, 5]\n",
     ["p.yaml:1: public_address: expected an IPv4 address, a list of 1 to 64 different "
      "IPv4 addresses, or null, found a list"]),
    ("too many public addresses",
     "public_address: [" + ", ".join(f"198.51.100.{i}" for i in range(1, 66)) + "]\n",
     ["p.yaml:1: public_address: expected an IPv4 address, a list of 1 to 64 different "
      "IPv4 addresses, or null, found a list"]),
    ("a listed public address inside",
     "inside_networks: [10.0.0.0/8]\npublic_address: [198.51.100.1, 10.0.0.1]\n",
     ["p.yaml:2: public_address: expected an address outside inside_networks, "
      "found '10.0.0.1'"]),
    ("addresses and interface", "public_interface: eth0\npublic_address: [192.0.2.1, "
     "192.0.2.3]\n",
     ["p.yaml:2: public_address: expected null when public_interface is set (give one of "
      "them), found ['192.0.2.1', '192.0.2.3']"]),
    ("address and interface", "public_interface: eth0\npublic_address: 203.0.113.7\n",
     ["p.yaml:2: public_address: expected null when public_interface is set (give one of "
      "them), found '203.0.113.7'"]),
    ("bad interface name", "public_interface: 'eth 0'\n",
     ["p.yaml:1: public_interface: expected an interface name of 1 to 15 letters, digits "
      "or _.:@+- (or null), found 'eth 0'"]),
    ("public address inside", "inside_networks: [10.0.0.0/8]\npublic_address: 10.0.0.1\n",
     ["p.yaml:2: public_address: expected an address outside inside_networks, "
      "found '10.0.0.1'"]),
    ("inside networks holding the public address",
     "public_address: 10.0.0.1\ninside_networks: [10.0.0.0/8]\n",
     ["p.yaml:2: inside_networks: expected networks that do not hold public_address "
      "(10.0.0.1), found 10.0.0.0/8"]),
    ("empty inside networks", "inside_networks: []\n",
     ["p.yaml:1: inside_networks: expected a non-empty list of at most 1024 IPv4 networks, "
      "found a list"]),
    ("networks not a list", "inside_networks: 10.0.0.0/8\n",
     ["p.yaml:1: inside_networks: expected a non-empty list of at most 1024 IPv4 networks, "
      "found '10.0.0.0/8'"]),
    ("unparsable network, on its own line", "acl:\n  clients:\n    deny:\n      - 10.0.0.0/8\n"
     "      - banana\n",
     ["p.yaml:5: acl.clients.deny[1]: expected an IPv4 network like 10.0.0.0/8, "
      "found 'banana'"]),
    ("host bits", "acl: {servers: {allow: [10.0.0.5/24]}}\n",
     ["p.yaml:1: acl.servers.allow[0]: expected an IPv4 network like 10.0.0.0/8, "
      "found '10.0.0.5/24' (host bits set)"]),
    ("a number for a network", "inside_networks: [10]\n",
     ["p.yaml:1: inside_networks[0]: expected an IPv4 network like 10.0.0.0/8, found 10"]),
    ("overlapping networks", "inside_networks:\n  - 10.0.0.0/8\n  - 192.168.0.0/16\n"
     "  - 10.1.0.0/16\n",
     ["p.yaml:4: inside_networks[2]: expected a network that does not overlap "
      "inside_networks[0] (10.0.0.0/8), found '10.1.0.0/16'"]),
    ("one network allowed and denied", "acl:\n  clients:\n    deny: [0.0.0.0/0]\n",
     ["p.yaml:3: acl.clients.deny[0]: expected a network not also in acl.clients.allow, "
      "found '0.0.0.0/0'"]),
    ("refuse: reply", "refuse: reply\n",
     ["p.yaml:1: refuse: expected drop, found 'reply' (refusing with an "
      "Outgoing-Call-Reply is not supported, see the README)"]),
    ("node", "call_ids: {node: 3, nodes: 2}\n",
     ["p.yaml:1: call_ids.node: expected call_ids.node from 1 to call_ids.nodes (2), "
      "found node 3"]),
    ("enum", "call_ids: {allocation: randm}\n",
     ["p.yaml:1: call_ids.allocation: expected one of random, sequential, found 'randm'"]),
    ("enum bool", "malformed: yes\n",
     ["p.yaml:1: malformed: expected one of drop, pass, found true"]),
    ("disconnect rule", "disconnect_rule: kernel\n",
     ["p.yaml:1: disconnect_rule: expected one of client, rfc, found 'kernel'"]),
    ("log level", "logging:\n  level: loud\n",
     ["p.yaml:2: logging.level: expected one of debug, info, warning, error, found 'loud'"]),
    ("log format", "logging:\n  format: xml\n",
     ["p.yaml:2: logging.format: expected one of text, json, found 'xml'"]),
    ("listen without port", "metrics:\n  listen: localhost\n",
     ["p.yaml:2: metrics.listen: expected host:port (an IPv4 address, [IPv6 address] or "
      "host name; a port from 1 to 65535), found 'localhost'"]),
    ("listen port 0", "metrics:\n  listen: 127.0.0.1:0\n",
     ["p.yaml:2: metrics.listen: expected host:port (an IPv4 address, [IPv6 address] or "
      "host name; a port from 1 to 65535), found '127.0.0.1:0'"]),
    ("listen bad address", "metrics:\n  listen: 1.2.3.999:80\n",
     ["p.yaml:2: metrics.listen: expected host:port (an IPv4 address, [IPv6 address] or "
      "host name; a port from 1 to 65535), found '1.2.3.999:80'"]),
    ("a group as a scalar", "\nlogging: 5\n",
     ["p.yaml:2: logging: expected a mapping with the keys level, format, found 5"]),
    ("a group as a list", "acl: [1]\n",
     ["p.yaml:1: acl: expected a mapping with the keys clients, servers, found a list"]),
    ("a scalar as a mapping", "malformed: {drop: 1}\n",
     ["p.yaml:1: malformed: expected one of drop, pass, found a mapping"]),
    ("null for a number", "limits:\n  max_calls:\n",
     ["p.yaml:2: limits.max_calls: expected an integer from 1 to 65535, found null"]),
    ("the top is a list", "- a\n- b\n",
     ["p.yaml:1: expected a mapping of policy keys, found a list"]),
    ("the top is a word", "hello\n",
     ["p.yaml:1: expected a mapping of policy keys, found 'hello'"]),
    ("YAML syntax", "limits:\n  max_calls: 5\n bad: 1\n",
     ["p.yaml:3: not valid YAML: expected <block end>, but found '<block mapping start>'"]),
    ("YAML syntax, unclosed list", "inside_networks: [10.0.0.0/8\nlimits: {}\n",
     ["p.yaml:2: not valid YAML: expected ',' or ']', but got ':'"]),
    ("two documents", "a: 1\n---\nb: 2\n",
     ["p.yaml:2: not valid YAML: but found another document"]),
]


@pytest.mark.parametrize(("text", "problems"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_error_place_and_wording(text: str, problems: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert caught.value.problems == problems
    assert str(caught.value) == "\n".join(problems)


def test_every_problem_is_listed_in_file_order() -> None:
    text = textwrap.dedent("""\
        limits:
          max_calls: 0
          max_calls_per_client: many
        bogus: 1
        call_ids: {first: 9, last: 3}
        queues: {outbound: 70000}
        public_address: 10.0.0.1
    """)
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert [p.split(":")[1] for p in caught.value.problems] == ["2", "3", "4", "5", "6", "7"]


def test_cross_checks_skip_fields_that_are_wrong_already() -> None:
    # inbound is out of range: no second message comparing it with outbound
    with pytest.raises(PolicyError) as caught:
        parse_policy("queues: {outbound: x, inbound: 1723}\n", "p.yaml")
    assert len(caught.value.problems) == 1


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^.*/nope.yaml: cannot read: No such file or "
                                          r"directory$"):
        read_policy(tmp_path / "nope.yaml")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"limits:\n  max_calls: \xff\n")
    with pytest.raises(PolicyError, match=r"b.yaml: cannot read: not UTF-8 text"):
        read_policy(binary)


# -- the ACL rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "allowed"), [
    ("10.0.5.7", True),     # /32 allow inside a /24 deny
    ("10.0.5.8", False),    # the /24 deny
    ("10.0.6.1", True),     # the /8 allow
    ("172.16.0.1", False),  # in no list
])
def test_most_specific_network_decides(address: str, allowed: bool) -> None:
    allow = (NET("10.0.0.0/8"), NET("10.0.5.7/32"))
    deny = (NET("10.0.5.0/24"),)
    assert acl_allows(IP(address), allow, deny) is allowed


def test_deny_wins_a_tie() -> None:  # only a Policy built in Python can have one
    net = (NET("10.0.0.0/8"),)
    assert not acl_allows(IP("10.1.1.1"), net, net)


# -- check-policy ----------------------------------------------------------------------------


def test_check_policy_prints_the_effective_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("limits:\n  max_calls_per_client: 1\n")
    assert cli.main(["check-policy", str(path)]) == 0
    out, err = capsys.readouterr()
    assert parse_policy(out).policy == Policy(max_calls_per_client=1)
    assert leaf_paths(out) == {f.path for f in FIELDS}  # defaults filled in
    assert "max_calls_per_client: 1\n" in out and "max_calls: 65535\n" in out
    assert err == f"natedit: {path}: valid; above, the effective policy (defaults filled in)\n"


def test_check_policy_lists_every_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("limits:\n  max_calls: 0\nbogus: 1\n")
    assert cli.main(["check-policy", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:2: limits.max_calls: expected an integer from 1 to 65535, found 0",
        f"{path}:3: bogus: unknown key; expected one of: public_address, public_interface, "
        "inside_networks, queues, call_ids, limits, timeouts, acl, refuse, malformed, "
        "disconnect_rule, datapath, on_worker_down, metrics, logging",
        f"natedit: {path}: 2 problems, not a valid policy",
    ]


def test_check_policy_of_the_deploy_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-policy", str(DEPLOY)]) == 0
    assert capsys.readouterr().out == dump_policy(Policy())


def test_json_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", LogFormat.JSON)
    try:
        logging.getLogger("natedit").warning("policy %s", "x")
        entry = json.loads(capsys.readouterr().err)
        assert (entry["level"], entry["message"]) == ("warning", "policy x")
        assert entry["time"].endswith("Z")
    finally:
        logs.setup("info")


# -- refusals in the core --------------------------------------------------------------------


def opened(tr: object, client: str = "10.0.0.5", port: int = 40000) -> Conversation:
    conv = Conversation(tr, client, client_port=port)  # type: ignore[arg-type]
    conv.open()
    return conv


def refusals(v: Verdict) -> list[tuple[str, str]]:
    return [(str(e.client_address), e.reason) for e in v.events if isinstance(e, CallRefused)]


def syn(client: str, port: int = 40000, server: str = SERVER) -> bytes:
    return build_tcp(client, server, port, 1723, 999, flags=TCP_SYN)


def test_denied_client_cannot_open_a_control_connection() -> None:
    tr = make_translator(clients_deny=(NET("10.0.0.6/32"),))
    v = tr.handle_packet(syn("10.0.0.6"), OUT, 0.0)
    assert (v.action, v.reason) == (Action.DROP, "refused:client_denied")
    assert v.events == (ConnectionRefused(IP("10.0.0.6"), IP(SERVER), Refusal.CLIENT_DENIED),)
    # its retransmitted SYN again, counted as an attempt; any later packet: dropped, quietly
    tr.handle_packet(syn("10.0.0.6"), OUT, 1.0)
    data = build_tcp("10.0.0.6", SERVER, 40000, 1723, 1000, msg(MT.OUTGOING_CALL_REQUEST,
                                                                 call_id=1))
    v = tr.handle_packet(data, OUT, 1.0)
    assert (v.action, v.reason, v.events) == (Action.DROP, "refused:client_denied", ())
    assert tr.stats.connections_refused == Counter({"client_denied": 2})
    assert tr.stats.verdicts[("drop", "refused:client_denied")] == 3
    assert tr.table.connections == {}
    # another client is not affected
    conv = opened(tr)
    establish(conv, 0x1234, 0x80)


def test_denied_server() -> None:
    tr = make_translator(servers_allow=(NET("198.51.100.0/24"),),
                         servers_deny=(NET(f"{SERVER}/32"),))
    v = tr.handle_packet(syn("10.0.0.5"), OUT, 0.0)
    assert (v.action, v.reason) == (Action.DROP, "refused:server_denied")
    v = tr.handle_packet(syn("10.0.0.5", server="198.51.100.3"), OUT, 0.0)
    assert v.accepted


def test_client_limit_refuses_once_per_request_not_per_retransmission() -> None:
    tr = make_translator(max_calls_per_client=1)
    a = opened(tr)
    establish(a, 0x1001, 0x80)
    a2 = opened(tr, port=40001)
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1002)
    v = a2.send(OUT, ocrq)
    assert (v.action, v.reason) == (Action.DROP, "refused:client_limit")
    assert refusals(v) == [("10.0.0.5", "client_limit")]
    for _ in range(3):  # TCP retransmits the same segment
        v = a2.send(OUT, ocrq)
        assert (v.action, v.reason, refusals(v)) == (Action.DROP, "refused:client_limit", [])
    assert tr.stats.calls_refused == Counter({"client_limit": 1})
    assert tr.stats.verdicts[("drop", "refused:client_limit")] == 4
    # others are not affected
    establish(opened(tr, "10.0.0.6"), 0x1002, 0x100)


def test_rate_limit_is_a_token_bucket_in_virtual_time() -> None:
    tr = make_translator(new_calls_per_second=1.0, new_calls_burst=2)
    a = opened(tr)
    establish(a, 0x1001, 0x80)
    establish(a, 0x1102, 0x100)  # the burst: two at t=0
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1203)
    v = a.send(OUT, ocrq)
    assert (v.action, v.reason) == (Action.DROP, "refused:rate_limited")
    a.now = 0.5
    assert a.send(OUT, ocrq).reason == "refused:rate_limited"  # retransmission, half a token
    b = opened(tr, "10.0.0.6")  # another client has its own bucket
    establish(b, 0x1001, 0x180)
    a.now = 1.0
    out = forward(a, OUT, ocrq)  # one token back: the retransmission goes through
    assert u16(payload_of(out), 12) != 0x1203
    assert tr.stats.calls_refused == Counter({"rate_limited": 1})
    a.now = 1.5
    assert a.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1304)).reason == (
        "refused:rate_limited")


def test_refusal_order_acl_then_limits_then_rate() -> None:
    tr = make_translator(max_calls_per_client=1, new_calls_per_second=0.001,
                         new_calls_burst=1)
    a = opened(tr)
    establish(a, 0x1001, 0x80)
    assert a.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=2)).reason == (
        "refused:client_limit")
    tr.set_policy(replace(tr.policy, max_calls_per_client=5))
    assert a.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=2)).reason == (
        "refused:rate_limited")


# -- reload into a running core --------------------------------------------------------------


def gre_round_trip(tr: object, conv: Conversation, client_call_id: int, public: int,
                   server_call_id: int) -> None:
    """GRE of one live call both ways, rewritten as it was before the reload."""
    v = conv.tr.handle_packet(gre_in(public), IN, conv.now)
    assert v.accepted and v.data is not None
    assert (v.data[16:20], u16(v.data, 26)) == (IP(conv.client).packed, client_call_id)
    v = conv.tr.handle_packet(gre_out(conv.client, server_call_id), OUT, conv.now)
    assert v.accepted and v.data is not None and v.data[12:16] == IP(PUBLIC).packed


def test_reload_keeps_live_calls_and_their_ids_when_the_range_moves() -> None:
    tr = make_translator(call_id_first=100, call_id_last=199)
    convs = [opened(tr, f"10.0.0.{5 + i}") for i in range(3)]
    publics = [establish(c, 0x1234, 0x80 * (i + 1)) for i, c in enumerate(convs)]
    assert all(100 <= p <= 199 for p in publics)
    tr.set_policy(replace(tr.policy, call_id_first=40000, call_id_last=40000))
    for i, (c, public) in enumerate(zip(convs, publics, strict=True)):
        gre_round_trip(tr, c, 0x1234, public, 0x80 * (i + 1))
    assert sorted(c.public_call_id for c in tr.calls()) == sorted(publics)
    # the new range has one ID; the three live IDs outside it do not use it up
    new = establish(convs[0], 0x4321, 0x300)
    assert new == 40000
    v = convs[1].send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x5555))
    assert v.reason == "refused:pool_exhausted"
    # a call that ends frees its old ID; it is not handed out again (outside the range)
    forward(convs[2], OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    convs[2].send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x80 * 3))
    assert publics[2] not in {c.public_call_id for c in tr.calls()}


def test_reload_with_a_tighter_limit_cuts_no_live_call() -> None:
    tr = make_translator()
    a, a2 = opened(tr), opened(tr, port=40001)
    p1, p2 = establish(a, 0x1001, 0x80), establish(a2, 0x1002, 0x100)
    tr.set_policy(replace(tr.policy, max_calls_per_client=1, max_calls=1))
    gre_round_trip(tr, a, 0x1001, p1, 0x80)
    gre_round_trip(tr, a2, 0x1002, p2, 0x100)
    assert len(tr.calls()) == 2
    assert a.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=3)).reason == (
        "refused:client_limit")
    assert opened(tr, "10.0.0.9").send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=3)).reason \
        == "refused:table_full"


def test_reload_denying_a_client_refuses_its_new_calls_not_its_live_ones() -> None:
    tr = make_translator()
    a = opened(tr)
    public = establish(a, 0x1001, 0x80)
    tr.set_policy(replace(tr.policy, clients_deny=(NET("10.0.0.5/32"),)))
    gre_round_trip(tr, a, 0x1001, public, 0x80)
    v = a.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1002))
    assert (v.reason, refusals(v)) == ("refused:client_denied",
                                       [("10.0.0.5", "client_denied")])
    v = tr.handle_packet(syn("10.0.0.5", port=40009), OUT, 0.0)
    assert v.reason == "refused:client_denied"


def test_reload_with_shorter_timeouts_applies_them_to_live_calls() -> None:
    tr = make_translator(call_idle_timeout=300.0, control_idle_timeout=1000.0)
    a = opened(tr)
    establish(a, 0x1001, 0x80)
    assert run_timers(tr, 5.0) == []
    tr.set_policy(replace(tr.policy, call_idle_timeout=10.0))
    assert tr.next_deadline() == 10.0
    events = run_timers(tr, 10.0)
    assert [e.reason for e in events if hasattr(e, "reason")] == ["idle"]


def test_reload_cannot_move_the_public_address() -> None:
    tr = make_translator()
    with pytest.raises(ValueError, match="public addresses cannot change"):
        tr.set_policy(replace(tr.policy, public_address=IP("203.0.113.9")))


# -- the reloader (what SIGHUP runs) ---------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Policy] = []

    def __call__(self, policy: Policy) -> None:
        if policy.max_calls == 13:
            raise ValueError("thirteen is unlucky")
        self.applied.append(policy)


def make_reloader(path: Path, text: str) -> tuple[reload.Reloader, Recorder, PolicyStatus]:
    path.write_text(text)
    running = read_policy(path).policy
    rec, status = Recorder(), PolicyStatus()
    return reload.Reloader(str(path), running, rec, status, clock=lambda: 1000.0), rec, status


def test_reload_valid_then_invalid_then_valid(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.yaml"
    r, rec, status = make_reloader(path, "limits:\n  max_calls_per_client: 5\n")
    assert (status.source, status.loaded_at) == (str(path), 1000.0)
    caplog.set_level(logging.INFO, "natedit")

    path.write_text("limits:\n  max_calls_per_client: 1\ncall_ids: {first: 40000}\n")
    r.clock = lambda: 2000.0
    assert r.reload()
    assert rec.applied[-1].max_calls_per_client == 1 and r.running == rec.applied[-1]
    assert (status.reloads, status.loaded_at, status.last_error) == (
        Counter(ok=1), 2000.0, None)
    assert caplog.messages[-1] == (
        f"policy reloaded from {path}: call_ids.first 1 -> 40000, "
        "limits.max_calls_per_client 5 -> 1")

    path.write_text("limits:\n  max_calls_per_client: many\n")
    r.clock = lambda: 3000.0
    assert not r.reload()
    assert len(rec.applied) == 1 and r.running.max_calls_per_client == 1
    problem = (f"{path}:2: limits.max_calls_per_client: expected an integer from 1 to 65535, "
               "found 'many'")
    assert (status.reloads, status.loaded_at, status.last_error) == (
        Counter(ok=1, failed=1), 2000.0, problem)
    assert caplog.records[-1].levelno == logging.ERROR
    assert caplog.messages[-1] == (
        f"policy reload rejected, the running policy stays: {problem}")

    path.unlink()
    assert not r.reload()
    assert status.last_error == f"{path}: cannot read: No such file or directory"

    path.write_text("limits:\n  max_calls_per_client: 1\ncall_ids: {first: 40000}\n")
    assert r.reload()
    assert caplog.messages[-1] == f"policy reloaded from {path}: no change"
    assert status.reloads == Counter(ok=2, failed=2) and status.last_error is None


def test_reload_rejects_restart_only_changes(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    r, rec, status = make_reloader(path, "queues: {outbound: 7, inbound: 8}\n")
    path.write_text("queues:\n  outbound: 7\n  inbound: 9\ninside_networks: [10.0.0.0/24]\n"
                    "metrics: {listen: '0.0.0.0:9000'}\npublic_interface: eth1\n"
                    "limits: {max_calls: 7}\n")
    assert not r.reload()
    assert rec.applied == []
    assert status.last_error == "\n".join([
        f"{path}:6: public_interface: expected null as in the running policy (changing it "
        "needs a restart), found 'eth1'",
        f"{path}:4: inside_networks: expected [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16] as "
        "in the running policy (changing it needs a restart), found [10.0.0.0/24]",
        f"{path}:3: queues.inbound: expected 8 as in the running policy (changing it needs "
        "a restart), found 9",
        f"{path}:5: metrics.listen: expected '127.0.0.1:9723' as in the running policy "
        "(changing it needs a restart), found '0.0.0.0:9000'",
    ])


def test_reload_rejected_by_the_core(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    r, _rec, status = make_reloader(path, "")
    path.write_text("limits: {max_calls: 13}\n")
    assert not r.reload()
    assert status.last_error == f"{path}: thirteen is unlucky"


def test_reload_without_a_file_restores_the_defaults() -> None:
    rec, status = Recorder(), PolicyStatus()
    r = reload.Reloader(None, Policy(max_calls=5), rec, status)
    assert r.reload() and rec.applied == [Policy()] and status.source is None


def test_reload_into_a_translator_with_live_calls(tmp_path: Path) -> None:
    """What the worker wires: file -> Reloader -> Translator.set_policy."""
    tr = make_translator()
    path = tmp_path / "p.yaml"
    path.write_text(f"public_address: {PUBLIC}\n")
    public_ip = IP(PUBLIC)
    r = reload.Reloader(str(path), read_policy(path).policy,
                        lambda p: tr.set_policy(p.with_public_address(public_ip)),
                        PolicyStatus())
    a = opened(tr)
    public = establish(a, 0x1001, 0x80)
    path.write_text(f"public_address: {PUBLIC}\ncall_ids: {{first: 50000, last: 50009}}\n"
                    "limits: {max_calls_per_client: 1}\n")
    assert r.reload()
    gre_round_trip(tr, a, 0x1001, public, 0x80)
    assert a.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=2)).reason == (
        "refused:client_limit")
    assert 50000 <= establish(opened(tr, "10.0.0.6"), 0x1001, 0x100) <= 50009
    path.write_text(f"public_address: {PUBLIC}\ncall_ids: {{first: 50000, last: 4}}\n")
    assert not r.reload()
    assert tr.policy.call_id_last == 50009  # the running policy stays
    gre_round_trip(tr, a, 0x1001, public, 0x80)


# -- SIGHUP in the worker loop and natedit reload ---------------------------------------------


class IdleTranslator:
    def handle_packet(self, data: bytes, direction: Direction, now: float) -> Verdict:
        raise AssertionError("no packets here")

    def next_deadline(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> list[Event]:
        return []


def test_sighup_reloads_between_packets_and_the_loop_goes_on() -> None:
    hangups: list[float] = []

    def on_hangup() -> None:
        hangups.append(time.monotonic())
        if len(hangups) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            os.kill(os.getpid(), signal.SIGHUP)

    with worker._signals() as wakeup:
        os.kill(os.getpid(), signal.SIGHUP)
        worker._loop([], wakeup, worker.Dispatcher(IdleTranslator()), on_hangup)
        assert wakeup.stop == "SIGTERM"
    assert len(hangups) == 2


def test_natedit_reload_needs_a_running_natedit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reload", "--pid-file", str(tmp_path / "none.pid")]) == 1
    assert capsys.readouterr().err == (
        f"natedit: error: cannot read {tmp_path}/none.pid: No such file or directory: "
        "is natedit running?\n")
    pid_file = tmp_path / "x.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # pytest: not natedit
    assert cli.main(["reload", "--pid-file", str(pid_file)]) == 1
    assert capsys.readouterr().err == (
        f"natedit: error: process {os.getpid()} (from {pid_file}) is not natedit\n")
    ready = tmp_path / "ready.json"
    ready.write_text("{}")
    assert cli.main(["reload", "--ready-file", str(ready)]) == 1
    assert "is natedit running?" in capsys.readouterr().err


def test_pid_file_is_ours_to_remove(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "natedit.pid")
    reload.write_pid_file(path)
    assert reload.read_pid(path) == os.getpid()
    Path(path).write_text("1\n")  # another natedit took it over
    reload.remove_pid_file(path)
    assert Path(path).exists()
    reload.write_pid_file(path)
    reload.remove_pid_file(path)
    assert not (tmp_path / "run").exists()


def test_reload_knows_natedit_by_its_entry_point_not_its_path() -> None:
    """A checkout under ~/natedit made every process started from it "natedit": the
    check reads the process name and the entry point, never a path's substring."""
    def cmd(*argv: str) -> bytes:
        return b"\0".join(a.encode() for a in argv) + b"\0"
    assert reload.is_natedit(b"natedit\n", cmd("python3", "-c", "import runpy"))
    assert reload.is_natedit(b"python3\n", cmd("/usr/bin/python3", "/usr/local/bin/natedit",
                                               "run"))
    assert reload.is_natedit(b"natedit\n", cmd("/usr/local/bin/natedit", "run"))
    assert reload.is_natedit(b"python3\n", cmd("python3", "-m", "natedit", "run"))
    assert not reload.is_natedit(b"python3\n", cmd("/home/me/natedit/.venv/bin/python3", "-m",
                                                   "pytest", "/home/me/natedit/tests"))
    assert not reload.is_natedit(b"pytest\n", cmd("/srv/natedit-ci/.venv/bin/pytest"))
    assert not reload.is_natedit(b"sleep\n", cmd("sleep", "natedit"))
