"""Real-peer test harness for natedit: namespaces, pptpd, pptp-linux, capture, scenarios.

The lab itself (namespaces, pptpd and pptp-linux, HDLC, the frame pump) is product
code, in :mod:`natedit.lab` (``natedit lab`` runs it); this package adds what only the
tests need: tshark captures, the scenarios, a multi-call PAC, the prerequisite gate.

Typical use::

    from tests.harness import KERNEL_HELPER, require_netns, scenarios

    def test_same_call_id() -> None:
        require_netns()
        result = scenarios.same_call_id(KERNEL_HELPER, n_clients=3)
        assert all(c.clean for c in result.calls.values()), result.describe()
"""

from __future__ import annotations

from natedit.lab.hdlc import HdlcDeframer, fcs16, hdlc_decode_all, hdlc_encode, ppp_frame
from natedit.lab.peers import PptpClient, PptpServer, StandinInfo, start_pptp_client, start_pptpd
from natedit.lab.pump import FramePump, PumpStats
from natedit.lab.topology import (
    ClientNode,
    Lab,
    LabError,
    PrivateMounts,
    call_id_random_bytes,
)

from . import scenarios
from .capture import (
    Capture,
    GrePacket,
    IcmpPacket,
    PptpMessage,
    WireSummary,
    decode_pcap,
)
from .prereq import prerequisite_problems, require_netns
from .scenarios import (
    KERNEL_HELPER,
    MASQUERADE_ONLY,
    CallResult,
    Gateway,
    ScenarioResult,
    Session,
    session,
    worker_gateway,
)

__all__ = [
    "KERNEL_HELPER",
    "MASQUERADE_ONLY",
    "CallResult",
    "Capture",
    "ClientNode",
    "FramePump",
    "Gateway",
    "GrePacket",
    "HdlcDeframer",
    "IcmpPacket",
    "Lab",
    "LabError",
    "PptpClient",
    "PptpMessage",
    "PptpServer",
    "PrivateMounts",
    "PumpStats",
    "ScenarioResult",
    "Session",
    "StandinInfo",
    "WireSummary",
    "call_id_random_bytes",
    "decode_pcap",
    "fcs16",
    "hdlc_decode_all",
    "hdlc_encode",
    "ppp_frame",
    "prerequisite_problems",
    "require_netns",
    "scenarios",
    "session",
    "start_pptp_client",
    "start_pptpd",
    "worker_gateway",
]
