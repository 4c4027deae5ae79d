"""Self-tests of the harness pieces that need no namespaces (and one tshark check)."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest

from natedit.core.wire import (
    MessageType,
    build_control_message,
    build_gre,
    parse_control_message,
    parse_gre,
)
from natedit.lab.hdlc import (
    FCS_GOOD,
    HdlcDeframer,
    fcs16,
    hdlc_decode_all,
    hdlc_encode,
    ppp_frame,
)
from natedit.lab.peers import _STANDIN, STANDIN_MARKER, parse_standin_hello
from natedit.lab.pump import FramePump, payload_for
from natedit.lab.topology import PUBLIC_GW_ADDR, SERVER_ADDR, Lab, call_id_random_bytes
from tests.harness import require_netns, scenarios, worker_gateway
from tests.harness.capture import CDN, OCRQ, decode_pcap
from tests.harness.pac import Pac, PacServer
from tests.harness.scenarios import Gateway, session


def test_fcs16_check_value() -> None:
    # CRC-16/X-25 (the PPP FCS with its final complement): check value of "123456789"
    assert fcs16(b"123456789") ^ 0xFFFF == 0x906E


def test_fcs_residue_and_roundtrip_of_every_byte_value() -> None:
    frame = ppp_frame(0x0021, bytes(range(256)) * 2)
    encoded = hdlc_encode(frame)
    assert encoded[0] == encoded[-1] == 0x7E
    assert 0x7E not in encoded[1:-1]
    assert all(b >= 0x20 for b in encoded[1:-1])  # every control char escaped (ACCM ~0)
    assert hdlc_decode_all(encoded) == [frame]
    raw = frame + (fcs16(frame) ^ 0xFFFF).to_bytes(2, "little")
    assert fcs16(raw) == FCS_GOOD


def test_deframer_streams_and_rejects_bad_fcs() -> None:
    rng = random.Random(7)
    frames = [ppp_frame(0x4E45, rng.randbytes(rng.randrange(1, 200))) for _ in range(50)]
    stream = b"junk" + b"".join(hdlc_encode(f) for f in frames)
    corrupted = bytearray(hdlc_encode(ppp_frame(0x4E45, b"xyz")))
    corrupted[5] ^= 0x01
    stream += bytes(corrupted)
    d = HdlcDeframer()
    out: list[bytes] = []
    pos = 0
    while pos < len(stream):
        step = rng.randrange(1, 40)
        out += d.feed(stream[pos : pos + step])
        pos += step
    out += d.feed(b"\x7e")
    assert out == frames
    assert d.bad_fcs == 1


def test_call_id_bytes_are_host_order() -> None:
    assert call_id_random_bytes(0x1234) == (0x1234).to_bytes(2, sys.byteorder)
    with pytest.raises(ValueError):
        call_id_random_bytes(0)  # pptp-linux falls back to rand() on zero


def test_standin_frame_is_valid_hdlc() -> None:
    namespace: dict[str, object] = {}
    exec(_STANDIN.split("tty.setraw(0)")[0].split("\n", 1)[1], namespace)
    hdlc = namespace["hdlc"]
    assert callable(hdlc)
    info = STANDIN_MARKER + b" pid=123 ppid=45"
    frames = hdlc_decode_all(hdlc(b"\xff\x03\x4e\x45" + info))
    assert len(frames) == 1
    hello = parse_standin_hello(frames[0])
    assert hello is not None and (hello.pid, hello.pptpctrl_pid) == (123, 45)


def test_pump_classifies_own_foreign_and_corrupt() -> None:
    a_ours, a_peer = socket.socketpair()
    b_ours, b_peer = socket.socketpair()
    pump = FramePump(tag=b"TEST")
    pump.add(1, a_ours)
    pump.add(2, b_ours)
    try:
        seq = pump.send_frame(1)
        assert seq == 0
        echoed = a_peer.recv(4096)
        a_peer.sendall(echoed)  # back to its sender: own
        b_peer.sendall(echoed)  # to the other call: foreign
        bad = bytearray(payload_for(b"TEST", 1, 0))
        bad[-1] ^= 0xFF
        a_peer.sendall(hdlc_encode(ppp_frame(0x4E45, bytes(bad))))  # own header, wrong bytes
        assert pump.wait_until(lambda: pump.stats[2].foreign == 1, 1.0)
        assert pump.wait_until(lambda: pump.stats[1].corrupt == 1, 1.0)
        assert pump.stats[1].returned == {0}
        assert pump.stats[2].foreign_from == {1: 1}
        a_peer.close()
        assert pump.wait_until(lambda: pump.stats[1].eof, 1.0)
    finally:
        pump.close()
        for s in (a_ours, b_ours, b_peer):
            s.close()


@pytest.mark.netns
def test_decode_pcap_with_tshark(tmp_path: Path) -> None:
    require_netns()
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    def ctrl(msg_type: int, body: bytes, length: int) -> bytes:
        head = length.to_bytes(2, "big") + b"\x00\x01\x1a\x2b\x3c\x4d"
        head += msg_type.to_bytes(2, "big") + b"\x00\x00"
        return head + body + bytes(length - 12 - len(body))

    ocrq = ctrl(OCRQ, (0x4321).to_bytes(2, "big") + b"\x00\x07", 168)
    ocrq2 = ctrl(OCRQ, (0x5555).to_bytes(2, "big") + b"\x00\x08", 168)
    cdn = ctrl(CDN, (128).to_bytes(2, "big") + b"\x03\x00", 148)
    gre = bytes.fromhex("3001880b0004") + (0x4321).to_bytes(2, "big") + bytes(4) + b"\xff\x03ab"
    base = Ether() / IP(src="198.51.100.1", dst="198.51.100.2")
    back = Ether() / IP(src="198.51.100.2", dst="198.51.100.1")
    pkts = [
        base / TCP(sport=40000, dport=1723, flags="PA", seq=1) / Raw(ocrq),
        back / TCP(sport=1723, dport=40000, flags="PA", seq=1) / Raw(cdn + cdn),
        Ether() / IP(src="198.51.100.2", dst="198.51.100.1", proto=47) / Raw(gre),
        # second connection: SYN, then an OCRQ split over two segments, sent out of
        # order, with the first half retransmitted
        base / TCP(sport=40001, dport=1723, flags="S", seq=1000),
        base / TCP(sport=40001, dport=1723, flags="PA", seq=1101) / Raw(ocrq2[100:]),
        base / TCP(sport=40001, dport=1723, flags="PA", seq=1001) / Raw(ocrq2[:100]),
        base / TCP(sport=40001, dport=1723, flags="PA", seq=1001) / Raw(ocrq2[:100]),
    ]
    path = tmp_path / "t.pcap"
    wrpcap(str(path), pkts)
    w = decode_pcap(path)
    assert [(m.msg_type, m.call_id) for m in w.pptp] == [
        (OCRQ, 0x4321),
        (CDN, 128),
        (CDN, 128),  # tshark's own PPTP dissector misses this second message of the segment
        (OCRQ, 0x5555),  # completed by the segment in frame 6
    ]
    assert w.pptp[-1].frame == 6
    assert w.gre_call_ids_from_server == {0x4321}
    assert w.control_connections == {("198.51.100.1", 40000), ("198.51.100.1", 40001)}
    assert not w.malformed_streams


@pytest.mark.netns
def test_worker_gateway_is_started_ready_and_stopped() -> None:
    """A dummy worker (kernel helper does the NAT) runs through a whole scenario."""
    require_netns()

    def argv(lab: Lab, ready: Path) -> list[str]:
        return ["sh", "-c", f"sleep 0.2; touch {ready}; echo worker up >&2; exec sleep 600"]

    gateway = worker_gateway("dummy", argv, base=Lab.gateway_kernel_helper)
    result = scenarios.same_call_id(gateway, n_clients=1, frames=5)
    assert result.gateway_alive, result.describe()
    assert [p.name for p in result.gateway_processes] == ["gateway[0]"]
    assert "worker up" in result.gateway_processes[0].log_tail
    assert result.call(0).clean, result.describe()
    # the worker this test started, by PID (other runs may have their own dummies)
    assert not Path(f"/proc/{result.gateway_processes[0].pid}").exists()


# --------------------------------------------------------------------------- the PAC

MT = MessageType
CLIENT = "10.0.0.11"


def _replies(pac: Pac, conn: int, data: bytes, chunk: int | None = None) -> list[bytes]:
    """Feed ``data`` (in ``chunk``-byte pieces) and return every reply, none closing."""
    out: list[bytes] = []
    step = chunk or len(data)
    for pos in range(0, len(data), step):
        replies, close = pac.feed(conn, data[pos : pos + step])
        assert not close
        out += replies
    return out


def _ocrq(call_id: int, serial: int) -> bytes:
    return build_control_message(MT.OUTGOING_CALL_REQUEST, call_id=call_id, serial=serial)


@pytest.mark.parametrize("chunk", [None, 1, 7, 100])
def test_pac_frames_by_length_and_answers_every_call(chunk: int | None) -> None:
    """Coalesced and split messages; every Outgoing-Call-Request gets a call of its own."""
    log: list[str] = []
    pac = Pac(log=log.append)
    pac.open_connection(1, CLIENT)
    echo = bytearray(build_control_message(MT.ECHO_REQUEST))
    echo[12:16] = b"\xde\xad\xbe\xef"
    stream = (
        build_control_message(MT.START_CONTROL_CONNECTION_REQUEST)
        + _ocrq(0x1234, 1)
        + build_control_message(MT.SET_LINK_INFO, peer_call_id=0)
        + _ocrq(0x1235, 2)
        + bytes(echo)
        + _ocrq(0x1234, 3)  # the same PNS Call ID again: still a call of its own
    )
    replies = [parse_control_message(r) for r in _replies(pac, 1, stream, chunk)]
    assert [r.message_type for r in replies] == [
        MT.START_CONTROL_CONNECTION_REPLY,
        MT.OUTGOING_CALL_REPLY,
        MT.OUTGOING_CALL_REPLY,
        MT.ECHO_REPLY,
        MT.OUTGOING_CALL_REPLY,
    ]
    assert replies[0].raw[14] == 1 and replies[0].raw[12:14] == b"\x01\x00"
    calls = [(r.call_id, r.peer_call_id, r.result_code) for r in replies if r.call_id is not None]
    assert calls == [(0, 0x1234, 1), (128, 0x1235, 1), (256, 0x1234, 1)]
    assert replies[3].raw[12:16] == b"\xde\xad\xbe\xef" and replies[3].raw[16] == 1
    assert sorted(pac.calls) == [0, 128, 256]
    assert sum(" open conn=1 " in f" {line}" for line in log) == 3
    assert any("msg=SLI" in line and "ignored" in line for line in log)


@pytest.mark.parametrize(("cdn_call_id", "expected"), [("own", 128), ("peer", 0x1235)])
def test_pac_clears_calls_and_stops(cdn_call_id: str, expected: int) -> None:
    pac = Pac(cdn_call_id=cdn_call_id)
    pac.open_connection(1, CLIENT)
    _replies(pac, 1, _ocrq(0x1234, 1) + _ocrq(0x1235, 2))
    (cdn,) = _replies(pac, 1, build_control_message(MT.CALL_CLEAR_REQUEST, call_id=0x1235))
    msg = parse_control_message(cdn)
    assert msg.message_type == MT.CALL_DISCONNECT_NOTIFY
    assert (msg.call_id, msg.raw[14]) == (expected, 4)  # result 4: cleared on request
    assert sorted(pac.calls) == [0]
    assert _replies(pac, 1, build_control_message(MT.CALL_CLEAR_REQUEST, call_id=0x9999)) == []
    replies, close = pac.feed(1, build_control_message(MT.STOP_CONTROL_CONNECTION_REQUEST))
    assert close
    assert [parse_control_message(r).message_type for r in replies] == [
        MT.STOP_CONTROL_CONNECTION_REPLY
    ]
    pac.close_connection(1, "stop")
    assert pac.calls == {} and pac.connections == {}


def test_pac_closes_on_a_malformed_header() -> None:
    pac = Pac()
    pac.open_connection(1, CLIENT)
    bad = build_control_message(MT.ECHO_REQUEST, length=20)  # Length wrong for the type
    replies, close = pac.feed(1, build_control_message(MT.ECHO_REQUEST) + bad)
    assert close and len(replies) == 1


def test_pac_echoes_gre_within_the_call_and_says_hello() -> None:
    pac = Pac()
    pac.open_connection(1, CLIENT)
    pac.open_connection(2, "10.0.0.12")
    _replies(pac, 1, _ocrq(0x1234, 1) + _ocrq(0x1235, 2))
    _replies(pac, 2, _ocrq(0x1234, 1))
    # hellos: one per call, each identifying its call, until the peer sends GRE
    hellos = pac.due_hellos(now=100.0)
    assert [dst for dst, _ in hellos] == [CLIENT, CLIENT, "10.0.0.12"]
    first = hellos[0][1]
    header = parse_gre(first)
    assert (header.call_id, header.sequence, header.ack) == (0x1234, 0, None)
    info = parse_standin_hello(first[header.header_length :])
    assert info is not None and info.args == "call=0 peer=4660 conn=1"
    assert pac.due_hellos(now=100.1) == []  # not due yet
    assert len(pac.due_hellos(now=100.3)) == 3
    # data on call 128 (the second call of connection 1) comes back on that call only
    payload = b"\xff\x03\x4e\x45" + bytes(range(40))
    (out,) = pac.gre(build_gre(CLIENT, SERVER_ADDR, 128, payload, seq=7))
    dst, gre = out
    header = parse_gre(gre)
    assert dst == CLIENT
    assert (header.call_id, header.sequence, header.ack) == (0x1235, 2, 7)
    assert gre[header.header_length :] == payload and header.payload_length == len(payload)
    (out,) = pac.gre(build_gre(CLIENT, SERVER_ADDR, 128, payload, seq=8, ack=1))
    assert parse_gre(out[1]).sequence == 3 and parse_gre(out[1]).ack == 8
    # call 128 was heard from: no more hellos for it; ack-only GRE also counts
    assert pac.gre(build_gre(CLIENT, SERVER_ADDR, 0, seq=None, ack=0)) == []
    assert [parse_gre(g).call_id for _, g in pac.due_hellos(now=101.0)] == [0x1234]
    # wrong source, unknown Call ID, not PPTP GRE: dropped
    assert pac.gre(build_gre("10.0.0.12", SERVER_ADDR, 128, payload, seq=9)) == []
    assert pac.gre(build_gre(CLIENT, SERVER_ADDR, 5, payload, seq=9)) == []
    assert pac.gre(b"\x45" + bytes(30)) == []


def _routed(lab: Lab) -> None:
    """No NAT: the gateway only forwards (the server needs a route back to the clients)."""
    lab.exec(lab.server_ns, ["ip", "route", "add", "10.0.0.0/24", "via", PUBLIC_GW_ADDR])


ROUTED = Gateway("routed", _routed)


@pytest.mark.netns
def test_pac_two_calls_on_one_control_connection_routed() -> None:
    """The PAC against pptp-linux without any NAT: two calls of one call manager, on one
    control connection, both clean."""
    require_netns()
    r = scenarios.two_calls_one_control(ROUTED, call_ids=(0x1234, 0x1235), server="pac")
    info = r.describe()
    assert r.server == "pac", info
    assert r.outcome["call_manager_count"] == 1, info
    assert r.outcome["control_connections"] == 1, info
    assert r.outcome["ocrq_call_ids_outside"] == [0x1234, 0x1235], info
    assert r.outcome["ocrp_server_call_ids"] == [0, 128], info
    assert r.outcome["ocrp_peer_call_ids"] == [0x1234, 0x1235], info
    assert r.outcome["ocrp_results"] == [1, 1], info
    assert r.outcome["pac_calls"] == [(1, 0, 0x1234), (1, 128, 0x1235)], info
    assert r.outcome["first_call_connected"] and r.outcome["second_call_connected"], info
    assert r.outcome["both_returned"], info
    assert all(c.clean and c.other == 0 for c in r.calls.values()), info
    assert r.total_foreign == 0, info
    hellos = {k: c.server_call.args if c.server_call else None for k, c in r.calls.items()}
    assert hellos == {0: "call=0 peer=4660 conn=1", 1: "call=128 peer=4661 conn=1"}, info
    assert r.outcome["server_call_ids"] == [0, 128], info
    assert r.outcome["public_call_ids"] == [0x1234, 0x1235], info
    assert not r.outcome["server_replaced_first_call"], info
    assert r.wire.icmp == [], info


@pytest.mark.netns
def test_pac_sigterm_ends_every_call() -> None:
    """SIGTERM: a Call-Disconnect-Notify per call, Stop-Control-Connection-Request, exit 0;
    pptp-linux hangs up both calls."""
    require_netns()
    with session(ROUTED, 1, server="pac") as s:
        assert isinstance(s.server, PacServer)
        first = s.start_call(0, forced_call_id=[0x1234, 0x1235], key=0)
        # the second pptp must find the first one's call manager up (else it starts its own)
        assert s.wait_connected([0]), s.server.log()
        s.start_call(0, share_with=first, key=1)
        assert s.wait_connected([1]), s.server.log()
        assert s.phase("before", [0, 1], 5), s.server.log()
        assert s.server.stop() == 0, s.server.log()
        assert s.server.proc.poll() == 0
        assert s.pump.wait_until(lambda: all(st.eof for st in s.pump.stats.values()), 3.0)
        log = s.server.log()
        r = s.finish("pac_sigterm", {})
    info = r.describe() + "\n" + log
    cdns = r.wire.messages(CDN)
    assert [(m.call_id, m.result) for m in cdns] == [(0, 3), (128, 3)], info
    assert [m.name for m in r.wire.pptp][-2:] == [
        "Stop-Control-Connection-Request",
        "Stop-Control-Connection-Reply",
    ], info
    assert "signal SIGTERM" in log and log.rstrip().endswith("exit"), info
    assert all(c.pptp_returncode is not None for c in r.calls.values()), info


def _pids_named(comm: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
