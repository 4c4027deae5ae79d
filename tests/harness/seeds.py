"""Make the fuzzers' seed capture from real peers: ``python -m tests.harness.seeds OUT.pcap``.

Runs pptpd and two pptp-linux clients (forced onto one private Call ID) through
natedit's worker in a namespace lab, captures the gateway's inside (br0: the
private view, as the outbound queue sees it) and outside (out0: the public
view, as the inbound GRE queue sees it) interfaces, and writes every IPv4
packet of both, link headers stripped, into one pcap (LINKTYPE_RAW), in time
order. The conversation: Start-Control-Connection, Outgoing-Call-Request and
Reply, GRE data both ways, a client killed (Call-Clear-Request,
Call-Disconnect-Notify, Stop-Control-Connection, FIN), a call the server ends
(its pptpctrl: Call-Disconnect-Notify, Stop-Control-Connection-Request), the
TCP closes. tests/data/README.md says which file came from this.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from scapy.utils import RawPcapReader, RawPcapWriter

from natedit.lab.topology import Lab

from .capture import Capture
from .prereq import require_netns
from .scenarios import Gateway, session

REPO = Path(__file__).resolve().parents[2]
FORCED = 0x1234
FRAMES = 6
"""GRE frames per call and phase: enough to seed, small enough to read."""


def _natedit(lab: Lab) -> None:
    lab.gateway_masquerade_only()
    ready = lab.tmpdir / "natedit.ready"
    lab.start_gateway_process(
        [sys.executable, "-m", "natedit", "run", "--ready-file", str(ready), "--pid-file",
         str(lab.tmpdir / "natedit.pid"), "--state", ""],
        ready=ready.exists, cwd=str(REPO), name="natedit")


def capture_seeds(out: Path) -> int:
    """Run the conversation, write ``out``; the number of packets written."""
    require_netns()
    with session(Gateway("natedit-seeds", _natedit), 2) as s:
        lab = s.lab
        inside = Capture(lab, iface=lab.gw_inside_if, name="inside").start()
        for i in (0, 1):
            s.start_call(i, forced_call_id=FORCED)
        s.wait_connected([0, 1])
        s.phase("data", [0, 1], FRAMES)
        victim = s.calls[0]
        victim.kill(signal.SIGTERM)  # its call manager clears the call and stops
        s.pump.linger(1.0)
        hello = s.pump.stats[1].hello
        if hello is not None:
            s.pptpd.end_call(hello, "pptpctrl")  # the server ends the other call
        s.pump.linger(1.0)
        inside.stop()
        s.capture.stop()
        paths = [inside.path, s.capture.path]
        packets: list[tuple[float, bytes]] = []
        for path in paths:
            reader = RawPcapReader(str(path))
            strip = 14 if reader.linktype == 1 else 0
            for data, meta in reader:
                ip = bytes(data[strip:])
                if ip and ip[0] >> 4 == 4:
                    packets.append((meta.sec + meta.usec / 1e6, ip))
            reader.close()
    packets.sort(key=lambda p: p[0])
    writer = RawPcapWriter(str(out), linktype=101)
    writer.write_header(None)
    for stamp, ip in packets:
        writer.write_packet(ip, sec=int(stamp), usec=int(stamp % 1 * 1e6))
    writer.close()
    return len(packets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    n = capture_seeds(args.out)
    print(f"{args.out}: {n} packets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
