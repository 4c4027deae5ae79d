"""Self-tests of the harness pieces that need no namespaces (and one tshark check)."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest

from tests.harness import scenarios, worker_gateway
from tests.harness.capture import CDN, OCRQ, decode_pcap
from tests.harness.hdlc import (
    FCS_GOOD,
    HdlcDeframer,
    fcs16,
    hdlc_decode_all,
    hdlc_encode,
    ppp_frame,
)
from tests.harness.lab import Lab, call_id_random_bytes, require_netns
from tests.harness.peers import _STANDIN, STANDIN_MARKER, parse_standin_hello
from tests.harness.pump import FramePump, payload_for


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
