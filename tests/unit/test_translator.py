"""Translator scenarios: several clients, several calls, every release path, GRE.

Scripts in virtual time: each test plays a conversation through
:class:`Conversation` and checks the verdicts, the bytes that leave, the
events and the call table; timers run through ``next_deadline()`` /
``handle_timer(now)`` only.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from natedit import (
    ACCEPT,
    Action,
    Allocation,
    CallEstablished,
    CallInfo,
    CallMapped,
    CallRefused,
    CallReleased,
    DisconnectRule,
    Event,
    MessageType,
    Policy,
    ProtocolViolation,
    Verdict,
)
from natedit.core.checksum import internet_checksum
from natedit.core.errors import DropReason
from natedit.core.translator import Translator
from natedit.core.wire import (
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    build_gre,
    build_ipv4,
    build_tcp,
    parse_gre,
    parse_ipv4,
)
from tests.pptp_flows import (
    IN,
    OUT,
    PUBLIC,
    SERVER,
    Conversation,
    assert_table_consistent,
    establish,
    forward,
    gre_in,
    gre_out,
    ip_checksum_ok,
    make_translator,
    msg,
    payload_of,
    run_timers,
    tcp_checksum_ok,
    u16,
)

MT = MessageType
IP = ipaddress.IPv4Address
PPP = b"\xff\x03\xc0\x21\x01\x01\x00\x04"
OTHER_SERVER = "203.0.113.9"


def opened(tr: Translator, client: str = "10.0.0.5", port: int = 40000,
           server: str = SERVER) -> Conversation:
    conv = Conversation(tr, client, client_port=port, server=server)
    conv.open()
    return conv


Released = list[tuple[int | None, str]]


def released(events: list[Event] | tuple[Event, ...] | list[object]) -> Released:
    """(client Call ID, reason) of every CallReleased among ``events``."""
    return [(e.call.client_call_id, e.reason) for e in events if isinstance(e, CallReleased)]


def check_gre_in(tr: Translator, public_id: int, client: str, client_call_id: int,
                 packet: bytes | None = None, now: float = 0.0) -> bytes:
    """Inbound GRE to ``public_id`` must leave for ``client`` with ``client_call_id``."""
    pkt = packet if packet is not None else gre_in(public_id, PPP)
    v = tr.handle_packet(pkt, IN, now)
    assert v.accepted and v.data is not None and v.reason is None, v
    out = v.data
    ip = parse_ipv4(out)
    assert ip_checksum_ok(out)
    assert (ip.src, ip.dst) == (pkt[12:16], IP(client).packed)
    g = parse_gre(out, ip.ihl)
    assert g.call_id == client_call_id
    changed = {i for i in range(len(pkt)) if pkt[i] != out[i]}
    assert changed <= {10, 11, 16, 17, 18, 19, ip.ihl + 6, ip.ihl + 7}
    return out


def check_gre_out(tr: Translator, client: str, server_call_id: int,
                  packet: bytes | None = None, now: float = 0.0) -> bytes:
    """Outbound GRE must leave from the public address, its Call ID untouched."""
    pkt = packet if packet is not None else gre_out(client, server_call_id, PPP)
    v = tr.handle_packet(pkt, OUT, now)
    assert v.accepted and v.data is not None and v.reason is None, v
    out = v.data
    ip = parse_ipv4(out)
    assert ip_checksum_ok(out)
    assert (ip.src, ip.dst) == (IP(PUBLIC).packed, ip.dst)
    assert parse_gre(out, ip.ihl).call_id == server_call_id
    changed = {i for i in range(len(pkt)) if pkt[i] != out[i]}
    assert changed <= {10, 11, 12, 13, 14, 15}
    return out


def verdict_of(tr: Translator, pkt: bytes, d: object, now: float = 0.0) -> tuple[Action,
                                                                                  str | None]:
    assert d in (IN, OUT)
    v = tr.handle_packet(pkt, IN if d is IN else OUT, now)
    return v.action, v.reason


# -- several clients, several calls --------------------------------------------------------


def test_three_clients_same_call_id_one_server() -> None:
    tr = make_translator()
    clients = ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
    publics = []
    for i, client in enumerate(clients):
        conv = opened(tr, client)
        publics.append(establish(conv, 0x1234, 0x80 * (i + 1)))
        events = [e for v in conv.verdicts for e in v.events]
        assert [type(e) for e in events] == [CallMapped, CallEstablished]
        assert events[1] == CallEstablished(CallInfo(IP(client), 0x1234, IP(SERVER),
                                                     0x80 * (i + 1), IP(PUBLIC), publics[-1],
                                                     "established"))
    assert len(set(publics)) == 3
    for i, client in enumerate(clients):
        check_gre_in(tr, publics[i], client, 0x1234)
        check_gre_out(tr, client, 0x80 * (i + 1))
    assert tr.stats.gre_packets == [3, 3]
    assert sorted((str(c.client_address), c.public_call_id) for c in tr.calls()) == sorted(
        zip(clients, publics, strict=True))


def test_two_calls_on_one_control_connection() -> None:
    tr = make_translator()
    conv = opened(tr)
    pa = establish(conv, 0x1234, 0x80)
    pb = establish(conv, 0x5678, 0x100)
    assert pa != pb and pa >> 8 != pb >> 8
    check_gre_in(tr, pa, "10.0.0.5", 0x1234)
    check_gre_in(tr, pb, "10.0.0.5", 0x5678)
    check_gre_out(tr, "10.0.0.5", 0x80)
    check_gre_out(tr, "10.0.0.5", 0x100)
    # clearing one leaves the other
    forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    v = conv.send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x80))
    assert released(v.events) == [(0x1234, "disconnect")]
    assert verdict_of(tr, gre_in(pa), IN) == (Action.DROP, "no_call")
    check_gre_in(tr, pb, "10.0.0.5", 0x5678)


def test_several_control_connections_per_client() -> None:
    tr = make_translator()
    a = opened(tr, port=40000)
    b = opened(tr, port=40001)
    c = opened(tr, port=40002, server=OTHER_SERVER)
    pa = establish(a, 0x1234, 0x80)
    pb = establish(b, 0x1234, 0x100)
    pc = establish(c, 0x1234, 0x80)  # same server Call ID, another server
    assert pa != pb
    check_gre_in(tr, pa, "10.0.0.5", 0x1234)
    check_gre_in(tr, pb, "10.0.0.5", 0x1234)
    check_gre_in(tr, pc, "10.0.0.5", 0x1234, gre_in(pc, PPP, server=OTHER_SERVER))
    check_gre_out(tr, "10.0.0.5", 0x100)
    out = check_gre_out(tr, "10.0.0.5", 0x80, build_gre("10.0.0.5", OTHER_SERVER, 0x80, PPP))
    assert parse_ipv4(out).dst == IP(OTHER_SERVER).packed
    # closing one connection releases only its calls
    v = a.send(OUT, b"", flags=TCP_RST | TCP_ACK)
    assert released(v.events) == [(0x1234, "reset")]
    assert len(tr.calls()) == 2


@pytest.mark.parametrize("ends", ["second", "first"])
def test_two_live_calls_with_one_server_call_id_never_evict_each_other(ends: str) -> None:
    """pptpd hands out a live call's Call ID again once its IDs wrap (the soak found it
    after 512 connections): two live calls of one client and server then share the
    server Call ID outbound GRE carries. The second took the outbound key and, when it
    ended, the first, still live, lost its outbound GRE (no_call). Whichever ends, the
    other keeps it (issue 11, item 8)."""
    tr = make_translator()
    a = opened(tr, port=40000)
    b = opened(tr, port=40001)
    pa = establish(a, 0x1234, 0x80)
    pb = establish(b, 0x1234, 0x80)  # the same server Call ID, on another connection
    assert pa != pb
    assert_table_consistent(tr.table)
    check_gre_out(tr, "10.0.0.5", 0x80)
    gone, kept, kept_public = (b, a, pa) if ends == "second" else (a, b, pb)
    v = gone.send(OUT, b"", flags=TCP_RST | TCP_ACK)
    assert released(v.events) == [(0x1234, "reset")]
    assert_table_consistent(tr.table)
    check_gre_out(tr, "10.0.0.5", 0x80)  # the live call still gets its outbound GRE
    check_gre_in(tr, kept_public, "10.0.0.5", 0x1234)
    route = tr.gre_route_outbound((IP("10.0.0.5").packed, IP(SERVER).packed, 0x80))
    assert route is not None and route.public_call_id == kept_public and route.outbound
    kept.send(OUT, b"", flags=TCP_RST | TCP_ACK)
    assert tr.calls() == [] and not tr.table.by_server and not tr.table._shadowed
    assert verdict_of(tr, gre_out("10.0.0.5", 0x80), OUT) == (Action.DROP, "no_call")


# -- every release path ----------------------------------------------------------------------


def call_up(**policy: object) -> tuple[Translator, Conversation, int]:
    tr = make_translator(**policy)
    conv = opened(tr)
    return tr, conv, establish(conv, 0x1234, 0x0080)


def assert_gone(tr: Translator, public: int) -> None:
    assert tr.calls() == []
    assert verdict_of(tr, gre_in(public), IN) == (Action.DROP, "no_call")
    assert verdict_of(tr, gre_out("10.0.0.5", 0x0080), OUT) == (Action.DROP, "no_call")
    assert public not in tr.table.used.get((IP(PUBLIC).packed, IP(SERVER).packed), set())


def test_call_clear_then_disconnect_notify() -> None:
    tr, conv, public = call_up()
    ccr = forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    assert u16(payload_of(ccr), 12) == public and tcp_checksum_ok(ccr)
    assert tr.calls()[0].state == "closing"
    check_gre_in(tr, public, "10.0.0.5", 0x1234)  # still up until the notify
    cdn = msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x0080)
    v = conv.send(IN, cdn)
    assert v.data is not None and u16(payload_of(v.data), 12) == 0x1234
    assert released(v.events) == [(0x1234, "disconnect")]
    assert_gone(tr, public)
    assert tr.stats.calls_released["disconnect"] == 1


@pytest.mark.parametrize(("rule", "server_variant_out"), [
    (DisconnectRule.CLIENT, 0x1234),  # the client's own Call ID, as nf_nat_pptp writes
    (DisconnectRule.RFC, 0x0080),  # the PAC's Call ID, left as RFC 2637 has it
])
def test_disconnect_notify_alone_with_the_servers_call_id(rule: DisconnectRule,
                                                          server_variant_out: int) -> None:
    tr, conv, public = call_up(disconnect_rule=rule)
    cdn = msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x0080)
    packet = conv.segment(IN, cdn)
    v = conv.send(IN, cdn)
    out = v.data if v.data is not None else packet
    assert u16(payload_of(out), 12) == server_variant_out
    assert tcp_checksum_ok(out)
    assert released(v.events) == [(0x1234, "disconnect")]
    assert_gone(tr, public)


@pytest.mark.parametrize("rule", list(DisconnectRule))
def test_disconnect_notify_alone_with_the_public_call_id(rule: DisconnectRule) -> None:
    tr, conv, public = call_up(disconnect_rule=rule)
    v = conv.send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=public))
    assert v.data is not None and u16(payload_of(v.data), 12) == 0x1234
    assert released(v.events) == [(0x1234, "disconnect")]
    assert_gone(tr, public)


def test_disconnect_notify_for_an_unknown_call_is_untouched() -> None:
    tr, conv, _public = call_up()
    v = conv.send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x7777))
    assert v is ACCEPT
    assert len(tr.calls()) == 1


def test_rfc_rule_disconnect_split_inside_the_call_id() -> None:
    # Sequential allocation gives public ID 1 (high byte 0) and pptpd's first Call ID is
    # 0x0080 (high byte 0 too): at the high byte the value could be either.
    _tr, conv, public = call_up(disconnect_rule=DisconnectRule.RFC,
                               allocation=Allocation.SEQUENTIAL)
    assert public == 1
    cdn = msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x0080)
    first = forward(conv, IN, cdn[:13])
    second = forward(conv, IN, cdn[13:])
    assert payload_of(first)[12:] + payload_of(second)[:1] == b"\x00\x80"


def test_refused_outgoing_call_reply() -> None:
    tr = make_translator()
    conv = opened(tr)
    public = u16(payload_of(forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST,
                                                   call_id=0x1234))), 12)
    v = conv.send(IN, msg(MT.OUTGOING_CALL_REPLY, call_id=0x0080, peer_call_id=public,
                          result_code=4))  # Busy
    assert v.data is not None and u16(payload_of(v.data), 14) == 0x1234  # the client learns
    assert released(v.events) == [(0x1234, "refused_by_server")]
    assert_gone(tr, public)


@pytest.mark.parametrize(("d", "mt"), [
    (OUT, MT.STOP_CONTROL_CONNECTION_REQUEST), (IN, MT.STOP_CONTROL_CONNECTION_REQUEST),
    (OUT, MT.STOP_CONTROL_CONNECTION_REPLY), (IN, MT.STOP_CONTROL_CONNECTION_REPLY),
])
def test_stop_control_connection(d: object, mt: MessageType) -> None:
    tr, conv, public = call_up()
    pb = establish(conv, 0x5678, 0x0100)
    v = conv.send(IN if d is IN else OUT, msg(mt))
    assert sorted(released(v.events)) == [(0x1234, "stop"), (0x5678, "stop")]
    assert_gone(tr, public)
    assert verdict_of(tr, gre_in(pb), IN) == (Action.DROP, "no_call")


@pytest.mark.parametrize("d", [OUT, IN], ids=["client", "server"])
def test_tcp_fin(d: object) -> None:
    tr, conv, public = call_up()
    first = OUT if d is OUT else IN
    v = conv.send(first, b"", flags=TCP_FIN | TCP_ACK)
    assert released(v.events) == [(0x1234, "fin")]
    assert_gone(tr, public)
    assert len(tr.table.connections) == 1  # half closed
    other = IN if first is OUT else OUT
    assert conv.send(other, b"", flags=TCP_FIN | TCP_ACK) is ACCEPT
    assert tr.table.connections == {}


def test_fin_with_a_final_message() -> None:
    _tr, conv, public = call_up()
    v = conv.send(OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234), flags=TCP_FIN | TCP_ACK)
    assert v.data is not None and u16(payload_of(v.data), 12) == public
    assert released(v.events) == [(0x1234, "fin")]


@pytest.mark.parametrize("d", [OUT, IN], ids=["client", "server"])
def test_tcp_rst(d: object) -> None:
    tr, conv, public = call_up()
    v = conv.send(OUT if d is OUT else IN, b"", flags=TCP_RST)
    assert released(v.events) == [(0x1234, "reset")]
    assert_gone(tr, public)
    assert tr.table.connections == {}
    # a stray RST for a forgotten connection does not create one
    assert conv.send(OUT, b"", flags=TCP_RST) is ACCEPT
    assert tr.table.connections == {}


def test_syn_with_a_new_isn_reuses_the_four_tuple() -> None:
    tr, conv, public = call_up()
    v = conv.feed(OUT, conv.segment(OUT, b"", seq=77, flags=TCP_SYN))
    assert released(v.events) == [(0x1234, "reset")]
    assert_gone(tr, public)
    assert len(tr.table.connections) == 1  # the new one


def test_request_timeout() -> None:
    tr = make_translator(request_timeout=60.0)
    conv = opened(tr)
    forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    assert tr.next_deadline() == 60.0
    assert run_timers(tr, 59.9) == []
    events = run_timers(tr, 60.0)
    assert released(events) == [(0x1234, "request_timeout")]
    assert tr.calls() == []
    assert tr.next_deadline() == 300.0  # the control connection's idle timer remains


def test_clear_request_without_disconnect_notify_times_out_as_clear_timeout() -> None:
    """A CLOSING call (Call-Clear-Request sent, no Call-Disconnect-Notify) waits
    request_timeout from the request, and says so: clear_timeout, not request_timeout."""
    tr = make_translator(request_timeout=30.0)
    conv = opened(tr)
    establish(conv, 0x1234, 0x80)
    conv.now = 5.0
    forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    assert [c.state for c in tr.calls()] == ["closing"]
    assert run_timers(tr, 34.9) == []
    assert released(run_timers(tr, 35.0)) == [(0x1234, "clear_timeout")]
    assert tr.stats.calls_released == {"clear_timeout": 1}


def test_idle_call_timeout_in_virtual_time() -> None:
    tr, _conv, public = call_up(call_idle_timeout=300.0, control_idle_timeout=1000.0)
    check_gre_in(tr, public, "10.0.0.5", 0x1234, now=100.0)
    check_gre_out(tr, "10.0.0.5", 0x0080, now=150.0)
    assert run_timers(tr, 449.0) == []
    assert tr.next_deadline() == 450.0
    events = run_timers(tr, 450.0)
    assert released(events) == [(0x1234, "idle")]
    assert_gone(tr, public)
    assert len(tr.table.connections) == 1


def test_control_messages_keep_a_call_alive() -> None:
    tr, conv, public = call_up(call_idle_timeout=300.0, control_idle_timeout=1000.0)
    conv.now = 250.0
    v = conv.send(IN, msg(MT.SET_LINK_INFO, peer_call_id=public))
    assert v.data is not None and u16(payload_of(v.data), 12) == 0x1234
    assert run_timers(tr, 549.0) == []
    assert released(run_timers(tr, 550.0)) == [(0x1234, "idle")]


def test_idle_control_timeout() -> None:
    tr, conv, public = call_up(call_idle_timeout=300.0, control_idle_timeout=100.0)
    conv.now = 60.0
    conv.send(OUT, msg(MT.ECHO_REQUEST))
    assert run_timers(tr, 159.0) == []
    events = run_timers(tr, 160.0)
    assert released(events) == [(0x1234, "control_idle")]
    assert_gone(tr, public)
    assert tr.table.connections == {}
    assert tr.next_deadline() is None
    assert tr.stats.calls_released["control_idle"] == 1


def test_reused_client_call_id_replaces_the_old_call() -> None:
    tr, conv, public = call_up()
    v = conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    assert released(v.events) == [(0x1234, "replaced")]
    assert [type(e) for e in v.events] == [CallReleased, CallMapped]
    assert len(tr.calls()) == 1 and tr.calls()[0].public_call_id != public


# -- the PAC-initiated call, and the client as a PAC ----------------------------------------


def test_incoming_call_flow() -> None:
    tr = make_translator()
    conv = opened(tr)
    icrq = msg(MT.INCOMING_CALL_REQUEST, call_id=0x0100)
    assert conv.send(IN, icrq) is ACCEPT  # nothing of ours in it
    icrp = forward(conv, OUT, msg(MT.INCOMING_CALL_REPLY, call_id=0x2345, peer_call_id=0x0100))
    public = u16(payload_of(icrp), 12)
    assert u16(payload_of(icrp), 14) == 0x0100 and public == tr.calls()[0].public_call_id
    [mapped] = conv.verdicts[-1].events
    assert isinstance(mapped, CallMapped)
    assert (mapped.call.client_call_id, mapped.call.public_call_id) == (0x2345, public)
    assert tr.calls() == [CallInfo(IP("10.0.0.5"), 0x2345, IP(SERVER), 0x0100, IP(PUBLIC),
                                   public, "incoming")]
    v = conv.send(IN, msg(MT.INCOMING_CALL_CONNECTED, peer_call_id=public))
    assert v.data is not None and u16(payload_of(v.data), 12) == 0x2345
    assert [type(e) for e in v.events] == [CallEstablished]
    assert tr.calls()[0].state == "established"
    check_gre_in(tr, public, "10.0.0.5", 0x2345)
    check_gre_out(tr, "10.0.0.5", 0x0100)


def test_incoming_call_refused_by_the_client() -> None:
    tr = make_translator()
    conv = opened(tr)
    conv.send(IN, msg(MT.INCOMING_CALL_REQUEST, call_id=0x0100))
    v = conv.send(OUT, msg(MT.INCOMING_CALL_REPLY, call_id=0x2345, peer_call_id=0x0100,
                           result_code=3))
    assert [type(e) for e in v.events] == [CallMapped, CallReleased]
    assert released(v.events) == [(0x2345, "refused_by_client")]
    assert tr.calls() == []


def test_incoming_call_times_out_without_connected() -> None:
    tr = make_translator(request_timeout=30.0)
    conv = opened(tr)
    forward(conv, OUT, msg(MT.INCOMING_CALL_REPLY, call_id=0x2345, peer_call_id=0x0100))
    assert released(run_timers(tr, 30.0)) == [(0x2345, "request_timeout")]


def test_client_as_pac() -> None:
    """The server dials in: Outgoing-Call-Request arrives, the client answers it."""
    tr = make_translator()
    conv = opened(tr)
    assert conv.send(IN, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x0100)) is ACCEPT
    ocrp = forward(conv, OUT, msg(MT.OUTGOING_CALL_REPLY, call_id=0x2345, peer_call_id=0x0100))
    public = u16(payload_of(ocrp), 12)
    assert u16(payload_of(ocrp), 14) == 0x0100
    assert tr.calls()[0].state == "established"
    check_gre_in(tr, public, "10.0.0.5", 0x2345)
    check_gre_out(tr, "10.0.0.5", 0x0100)
    assert conv.send(IN, msg(MT.CALL_CLEAR_REQUEST, call_id=0x0100)) is ACCEPT
    assert tr.calls()[0].state == "closing"
    cdn = forward(conv, OUT, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x2345))
    assert u16(payload_of(cdn), 12) == public
    assert released(conv.verdicts[-1].events) == [(0x2345, "disconnect")]


@pytest.mark.parametrize("mt", [MT.WAN_ERROR_NOTIFY, MT.SET_LINK_INFO])
def test_peer_call_id_mapped_back(mt: MessageType) -> None:
    _tr, conv, public = call_up()
    v = conv.send(IN, msg(mt, peer_call_id=public))
    assert v.data is not None and u16(payload_of(v.data), 12) == 0x1234
    assert tcp_checksum_ok(v.data)
    # the client's own Set-Link-Info names the server's Call ID: untouched
    assert conv.send(OUT, msg(MT.SET_LINK_INFO, peer_call_id=0x0080)) is ACCEPT
    # a Peer's Call ID that is no public ID of this connection: untouched
    assert conv.send(IN, msg(mt, peer_call_id=public ^ 0x0101)) is ACCEPT


def test_another_connections_public_id_is_not_mapped() -> None:
    tr = make_translator()
    a = opened(tr, "10.0.0.5")
    b = opened(tr, "10.0.0.6")
    pa = establish(a, 0x1234, 0x80)
    establish(b, 0x5678, 0x100)
    assert b.send(IN, msg(MT.SET_LINK_INFO, peer_call_id=pa)) is ACCEPT


def test_stats_count_messages_and_rewrites() -> None:
    tr, _conv, _public = call_up()
    assert tr.stats.messages[("outbound", "OUTGOING_CALL_REQUEST")] == 1
    assert tr.stats.messages[("inbound", "OUTGOING_CALL_REPLY")] == 1
    assert tr.stats.rewrites[("OUTGOING_CALL_REQUEST", "new")] == 1
    assert tr.stats.rewrites[("OUTGOING_CALL_REPLY", "peer")] == 1
    assert tr.stats.calls_mapped == 1


# -- GRE ---------------------------------------------------------------------------------------


def test_gre_ack_only_and_seq_ack() -> None:
    tr, _conv, public = call_up()
    ack_in = build_gre(SERVER, PUBLIC, public, b"", seq=None, ack=41)
    assert ack_in[20:22] == b"\x20\x81"
    out = check_gre_in(tr, public, "10.0.0.5", 0x1234, ack_in)
    assert parse_gre(out, 20).ack == 41 and parse_gre(out, 20).sequence is None
    ack_out = build_gre("10.0.0.5", SERVER, 0x0080, b"", seq=None, ack=42)
    check_gre_out(tr, "10.0.0.5", 0x0080, ack_out)
    both = build_gre(SERVER, PUBLIC, public, PPP, seq=7, ack=6)
    out = check_gre_in(tr, public, "10.0.0.5", 0x1234, both)
    g = parse_gre(out, 20)
    assert (g.sequence, g.ack, out[20 + g.header_length :]) == (7, 6, PPP)


def test_gre_with_ip_options() -> None:
    tr, _conv, public = call_up()
    opts = b"\x94\x04\x00\x00\x01\x01\x01\x00"
    pkt = build_gre(SERVER, PUBLIC, public, PPP, ip_options=opts)
    out = check_gre_in(tr, public, "10.0.0.5", 0x1234, pkt)
    assert parse_ipv4(out).ihl == 28
    check_gre_out(tr, "10.0.0.5", 0x0080, build_gre("10.0.0.5", SERVER, 0x0080, PPP,
                                                    ip_options=opts))


def test_gre_ip_checksum_with_many_addresses() -> None:
    for n in range(1, 255, 7):
        tr = make_translator()
        client = f"10.{n}.{255 - n}.{n}"
        conv = opened(tr, client)
        public = establish(conv, n << 8 | n, 0x80)
        check_gre_in(tr, public, client, n << 8 | n)
        check_gre_out(tr, client, 0x80)


def plain_gre(src: str, dst: str) -> bytes:
    return build_ipv4(src, dst, 47, bytes.fromhex("00000800") + b"\x45" + bytes(19))


def test_non_pptp_gre_is_left_alone() -> None:
    tr, _conv, _public = call_up()
    for pkt, d in [(plain_gre(SERVER, PUBLIC), IN), (plain_gre("10.0.0.5", SERVER), OUT)]:
        v = tr.handle_packet(pkt, d, 0.0)
        assert (v.action, v.data, v.reason) == (Action.ACCEPT, None, "not_pptp_gre")
    assert tr.stats.verdicts[("accept", "not_pptp_gre")] == 2


def test_gre_without_a_live_call() -> None:
    tr, _conv, public = call_up()
    assert verdict_of(tr, gre_in(public ^ 0x00FF), IN) == (Action.DROP, "no_call")
    assert verdict_of(tr, gre_out("10.0.0.5", 0x0081), OUT) == (Action.DROP, "no_call")
    assert verdict_of(tr, gre_out("10.0.0.6", 0x0080), OUT) == (Action.DROP, "no_call")
    # from the wrong server address, to a live public Call ID
    assert verdict_of(tr, gre_in(public, server=OTHER_SERVER), IN) == (Action.DROP, "no_call")
    # to an address that is not ours
    v = tr.handle_packet(build_gre(SERVER, "192.0.2.77", public, PPP), IN, 0.0)
    assert (v.action, v.reason) == (Action.ACCEPT, "not_ours")


def test_gre_before_the_server_answered() -> None:
    tr = make_translator()
    conv = opened(tr)
    public = u16(payload_of(forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST,
                                                   call_id=0x1234))), 12)
    # inbound works (the client Call ID is known); outbound needs the server's Call ID
    check_gre_in(tr, public, "10.0.0.5", 0x1234)
    assert verdict_of(tr, gre_out("10.0.0.5", 0x0080), OUT) == (Action.DROP, "no_call")


def test_gre_on_a_split_call_id_waits_for_the_low_byte() -> None:
    tr = make_translator()
    conv = opened(tr)
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)
    forward(conv, OUT, ocrq[:13])
    [call] = tr.table.calls()
    assert call.client_call_id is None
    v = tr.handle_packet(gre_in(call.public_call_id), IN, 0.0)
    assert (v.action, v.reason) == (Action.DROP, "no_call")


def fragment(pkt: bytes, frag: int) -> bytes:
    buf = bytearray(pkt)
    struct.pack_into("!H", buf, 6, frag)
    struct.pack_into("!H", buf, 10, 0)
    struct.pack_into("!H", buf, 10, internet_checksum(buf[:20]))
    return bytes(buf)


def test_first_fragments_are_dropped() -> None:
    tr, _conv, public = call_up()
    v = tr.handle_packet(fragment(gre_in(public, PPP * 4), 0x2000), IN, 0.0)
    assert (v.action, v.reason) == (Action.DROP, "fragment")
    v = tr.handle_packet(fragment(gre_out("10.0.0.5", 0x0080, PPP * 4), 0x2000), OUT, 0.0)
    assert (v.action, v.reason) == (Action.DROP, "fragment")


def test_non_first_fragment_is_dropped() -> None:
    tr, _conv, _public = call_up()
    # offset 24 bytes, last fragment: the payload is PPP data, not a GRE header
    pkt = fragment(build_ipv4(SERVER, PUBLIC, 47, PPP * 4), 3)
    assert verdict_of(tr, pkt, IN) == (Action.DROP, "fragment")


def test_gre_with_checksum_bit_is_not_pptp_gre() -> None:
    tr, _conv, public = call_up()
    pkt = bytearray(gre_in(public))
    pkt[20] |= 0x80  # C: a checksum field would follow the protocol type
    assert verdict_of(tr, bytes(pkt), IN) == (Action.ACCEPT, "not_pptp_gre")


# -- malformed packets ---------------------------------------------------------------------------


def tcp_to_1723(payload: bytes = b"") -> bytes:
    return build_tcp("10.0.0.5", SERVER, 40000, 1723, 1000, payload)


def _set(pkt: bytes, at: int, value: int, fix_ip: bool = True) -> bytes:
    buf = bytearray(pkt)
    buf[at] = value
    return fragment(bytes(buf), struct.unpack_from("!H", buf, 6)[0]) if fix_ip else bytes(buf)


MALFORMED: list[tuple[str, bytes, object, str]] = [
    ("empty", b"", OUT, "short_ip"),
    ("19 bytes", gre_in(1)[:19], IN, "short_ip"),
    ("IPv6", b"\x60" + bytes(39), IN, "not_ipv4"),
    ("IHL 4", _set(gre_in(1), 0, 0x44, fix_ip=False), IN, "bad_ip_header"),
    ("total length beyond data", gre_in(1)[:-1], IN, "bad_ip_header"),
    ("GRE 7 bytes in", build_ipv4(SERVER, PUBLIC, 47, bytes.fromhex("3001880b000412")), IN,
     "short_gre"),
    ("GRE 7 bytes out", build_ipv4("10.0.0.5", SERVER, 47, bytes(7)), OUT, "short_gre"),
    ("TCP 19 bytes", build_ipv4("10.0.0.5", SERVER, 6, tcp_to_1723()[20:39]), OUT,
     "short_tcp"),
    ("TCP data offset 4", build_ipv4("10.0.0.5", SERVER, 6,
                                     _set(tcp_to_1723(), 32, 0x40, fix_ip=False)[20:]), OUT,
     "bad_tcp_header"),
    ("TCP data offset beyond", build_ipv4("10.0.0.5", SERVER, 6,
                                          _set(tcp_to_1723(), 32, 0xF0, fix_ip=False)[20:]),
     OUT, "bad_tcp_header"),
]


@pytest.mark.parametrize(("pkt", "d", "reason"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_packets_are_dropped_with_a_reason(pkt: bytes, d: object,
                                                     reason: str) -> None:
    tr, _conv, _public = call_up()
    v = tr.handle_packet(pkt, IN if d is IN else OUT, 0.0)
    assert (v.action, v.reason) == (Action.DROP, reason)
    assert [e.reason for e in v.events if isinstance(e, ProtocolViolation)] == [reason]
    assert tr.stats.verdicts[("drop", reason)] == 1


def test_other_traffic_is_not_ours() -> None:
    tr, _conv, _public = call_up()
    for pkt, d in [
        (build_tcp("10.0.0.5", SERVER, 40000, 443, 1, b"x"), OUT),
        (build_tcp(SERVER, "10.0.0.5", 443, 40000, 1, b"x"), IN),
        (build_tcp(SERVER, "10.0.0.5", 40000, 1723, 1, b"x"), IN),  # to a local pptpd
        (build_ipv4("10.0.0.5", SERVER, 17, bytes(8)), OUT),
        (build_ipv4(SERVER, PUBLIC, 1, bytes(8)), IN),
    ]:
        assert tr.handle_packet(pkt, d, 0.0) is ACCEPT


def test_set_policy_keeps_live_calls() -> None:
    tr, conv, public = call_up()
    tr.set_policy(Policy(public_address=IP(PUBLIC), max_calls=1))
    check_gre_in(tr, public, "10.0.0.5", 0x1234)
    v = conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x5678))
    assert v.reason == "refused:table_full"
    assert [type(e) for e in v.events] == [CallRefused]
    with pytest.raises(ValueError):
        tr.set_policy(Policy())


def test_translator_needs_a_public_address() -> None:
    with pytest.raises(ValueError):
        Translator(Policy())


def test_verdict_shapes() -> None:
    assert Verdict(Action.ACCEPT) == ACCEPT and ACCEPT.accepted
    assert not Verdict(Action.DROP, reason=DropReason.GAP).accepted


def test_split_peer_call_id_of_no_call_is_untouched() -> None:
    _tr, conv, public = call_up()
    other = public ^ 0x8000  # a high byte no call of this connection has
    sli = msg(MT.SET_LINK_INFO, peer_call_id=other)
    first = forward(conv, IN, sli[:13])
    rest = forward(conv, IN, sli[13:])
    assert payload_of(first) + payload_of(rest) == sli
    # and with a known high byte, split the same way, it is rewritten
    sli = msg(MT.SET_LINK_INFO, peer_call_id=public)
    first = forward(conv, IN, sli[:13])
    rest = forward(conv, IN, sli[13:])
    assert u16(payload_of(first) + payload_of(rest), 12) == 0x1234


def test_request_times_out_before_the_message_is_complete() -> None:
    tr = make_translator(request_timeout=60.0)
    conv = opened(tr)
    ocrq = msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)
    head = forward(conv, OUT, ocrq[:100])
    public = u16(payload_of(head), 12)
    assert released(run_timers(tr, 60.0)) == [(0x1234, "request_timeout")]
    conv.now = 61.0
    v = conv.send(OUT, ocrq[100:])
    assert v is ACCEPT  # no CallMapped for a call that is already gone
    assert tr.calls() == []
    assert verdict_of(tr, gre_in(public), IN) == (Action.DROP, "no_call")


def test_clean_close_leaves_no_connection_record() -> None:
    tr = make_translator()
    conv = opened(tr)
    conv.send(OUT, b"", flags=TCP_FIN | TCP_ACK)
    conv.send(IN, b"", flags=TCP_FIN | TCP_ACK)
    assert tr.table.connections == {}
    conv.out_seq += 1
    assert conv.send(OUT, b"", flags=TCP_ACK) is ACCEPT  # the final ACK of the close
    assert tr.table.connections == {}
    assert tr.next_deadline() is None


def test_client_as_pac_incoming_call() -> None:
    """The client (a PAC) places an Incoming-Call-Request; the server (a PNS) answers."""
    tr = make_translator()
    conv = opened(tr)
    icrq = forward(conv, OUT, msg(MT.INCOMING_CALL_REQUEST, call_id=0x2345))
    public = u16(payload_of(icrq), 12)
    assert public == tr.calls()[0].public_call_id and tr.calls()[0].state == "requested"
    v = conv.send(IN, msg(MT.INCOMING_CALL_REPLY, call_id=0x0100, peer_call_id=public))
    assert v.data is not None and u16(payload_of(v.data), 14) == 0x2345
    assert u16(payload_of(v.data), 12) == 0x0100
    assert [type(e) for e in v.events] == [CallEstablished]
    # its Incoming-Call-Connected names the server's Call ID: nothing to rewrite
    assert conv.send(OUT, msg(MT.INCOMING_CALL_CONNECTED, peer_call_id=0x0100)) is ACCEPT
    check_gre_in(tr, public, "10.0.0.5", 0x2345)
    check_gre_out(tr, "10.0.0.5", 0x0100)


def test_ambiguous_split_disconnect_is_left_as_it_came() -> None:
    """A documented limit: Call-Disconnect-Notify cut between its Call ID bytes, when one
    call's server ID and another's public ID share the high byte, cannot be decided from
    the first byte. natedit then leaves the field as it came (counted), rather than
    write a low byte under an unrewritten high byte and invent a third value."""
    def run(cut: list[bytes]) -> bytes:
        tr = make_translator(allocation=Allocation.SEQUENTIAL)
        conv = opened(tr)
        assert establish(conv, 0x1234, 0x0100) == 0x0001  # A: public 0x0001, server 0x0100
        assert establish(conv, 0x5678, 0x0080) == 0x0100  # B: public 0x0100, server 0x0080
        return b"".join(payload_of(forward(conv, IN, seg)) for seg in cut)

    cdn = msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x0100)  # A's server Call ID
    whole = run([cdn])
    assert u16(whole, 12) == 0x1234
    assert u16(run([cdn[:13], cdn[13:]]), 12) == 0x0100
