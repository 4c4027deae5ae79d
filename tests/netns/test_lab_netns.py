"""natedit.lab.netns, the one namespace builder: a topology as data, built, then removed whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from natedit.lab.netns import Address, Bridge, Netns, Port, Route, Topology, Veth, unique_prefix
from natedit.lab.procs import LabError
from natedit.lab.topology import Lab
from tests.scratch_ns import require_scratch_ns

# a client on a bridge, a router with two public addresses, a server with a route back
ROUTED = Topology(
    nodes=("client", "gw", "server"),
    bridges=(Bridge("gw", "br0", "10.0.0.1/24"),),
    links=(Veth(Port("gw", "p1", bridge="br0"), Port("client", "eth0", "10.0.0.11/24")),
           Veth(Port("gw", "out0", "198.51.100.1/24"), Port("server", "eth0", "198.51.100.2/24"))),
    addresses=(Address("gw", "out0", "198.51.100.3/24"),),
    routes=(Route("client", "default", "10.0.0.1"), Route("server", "10.0.0.0/24", "198.51.100.1")),
    forwarding=("gw",),
)


ECHO = """
import socket
s = socket.create_server(("198.51.100.2", 7000)); print("listening", flush=True)
while True:
    c, (addr, _) = s.accept(); c.sendall(f"seen from {addr}".encode()); c.close()
"""
HELLO = """
import socket
print(socket.create_connection(("198.51.100.2", 7000), timeout=5).recv(100).decode(), end="")
"""


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_topologies_add_up_and_name_every_interface() -> None:
    more = Topology(nodes=("gw", "inside"),
                    links=(Veth(Port("gw", "p2", bridge="br0"), Port("inside", "eth0")),),
                    forwarding=("inside",))
    both = ROUTED + more
    assert both.nodes == ("client", "gw", "server", "inside")
    assert both.links == ROUTED.links + more.links
    assert both.forwarding == ("gw", "inside")
    assert list(both.interfaces()) == [("gw", "br0"), ("gw", "p1"), ("client", "eth0"),
                                       ("gw", "out0"), ("server", "eth0"), ("gw", "p2"),
                                       ("inside", "eth0")]


def test_names_carry_the_prefix_and_only_known_nodes() -> None:
    prefix = unique_prefix("t")
    assert prefix.startswith(f"t{os.getpid() % 100000:05d}") and len(prefix) == 10
    net = Netns(ROUTED, prefix)
    assert net.names == [f"{prefix}-client", f"{prefix}-gw", f"{prefix}-server"]
    with pytest.raises(LabError, match="'nowhere' is not a node"):
        net.name("nowhere")
    with pytest.raises(LabError, match="is not a namespace of this lab"):
        net.argv("init", ["true"])  # nothing built: no namespace is ours yet


@pytest.mark.netns
def test_built_as_described_then_removed_with_what_runs_inside() -> None:
    require_scratch_ns()
    with Netns(ROUTED) as net:
        gw, client, server = net.name("gw"), net.name("client"), net.name("server")
        assert set(net.names) <= set(namespaces().split())
        addrs = net.exec(gw, ["ip", "-4", "-o", "addr", "show", "dev", "out0"]).stdout
        assert "198.51.100.1/24" in addrs and "198.51.100.3/24" in addrs
        assert "master br0" in net.exec(gw, ["ip", "-o", "link", "show", "p1"]).stdout
        assert net.exec(gw, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        assert net.exec(server, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
        offload = net.exec(client, ["ethtool", "-k", "eth0"]).stdout
        assert "tx-checksumming: off" in offload
        # routed through the gateway's bridge, and back by the server's route
        echo = subprocess.Popen(net.argv(server, [sys.executable, "-c", ECHO]),
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert echo.stdout is not None and echo.stdout.readline() == "listening\n"
        hello = [sys.executable, "-c", HELLO]
        assert net.exec(client, hello).stdout == "seen from 10.0.0.11"
        assert echo.pid in net.pids_in(server) and echo.pid in net.pids()
        assert echo.pid not in net.pids_in(client)
    assert echo.wait(timeout=5) != 0  # still serving: killed by PID at teardown
    echo.stdout.close()
    assert not any(name.startswith(net.prefix) for name in namespaces().split())


@pytest.mark.netns
def test_a_failed_build_removes_what_it_made() -> None:
    require_scratch_ns()
    broken = Topology(nodes=("a", "b"),
                      links=(Veth(Port("a", "eth0", "10.0.0.1/24"), Port("b", "eth0")),),
                      routes=(Route("b", "default", "10.9.9.9"),))  # b has no such network
    net = Netns(broken)
    with pytest.raises(LabError, match=r"route add default via 10\.9\.9\.9"), net:
        pass
    assert not any(name.startswith(net.prefix) for name in namespaces().split())
    assert not Path(f"/run/netns/{net.prefix}-a").exists()


@pytest.mark.netns
def test_the_lab_takes_extra_nodes_and_addresses_and_removes_them() -> None:
    require_scratch_ns()
    inside_server = Topology(
        nodes=("isrv",),
        links=(Veth(Port("gw", "pisrv", bridge="br0"), Port("isrv", "eth0", "10.0.0.50/24")),),
        addresses=(Address("gw", "out0", "198.51.100.3/24"),),
        routes=(Route("isrv", "default", "10.0.0.1"),),
    )
    with Lab(1, extra=inside_server) as lab:
        isrv = lab.node("isrv")
        assert lab.namespaces == [lab.gw_ns, lab.server_ns, lab.clients[0].ns, isrv]
        assert "198.51.100.3/24" in lab.exec(lab.gw_ns, ["ip", "-o", "addr", "show", "out0"]).stdout
        assert lab.gateway_of("gw") is lab.gateway
        lab.gateway_masquerade_only()
        assert "-o out0 -j MASQUERADE" in lab.iptables("-t", "nat", "-S")
        echo = lab.popen(isrv, [sys.executable, "-c", ECHO.replace("198.51.100.2", "10.0.0.50")],
                         stdout=subprocess.PIPE)
        assert echo.stdout is not None and echo.stdout.readline() == b"listening\n"
        hello = [sys.executable, "-c", HELLO.replace("198.51.100.2", "10.0.0.50")]
        assert lab.exec(lab.clients[0].ns, hello).stdout == "seen from 10.0.0.11"
        tmpdir = lab.tmpdir
    assert echo.returncode is not None
    assert not any(name.startswith(lab.net.prefix) for name in namespaces().split())
    assert not tmpdir.exists()
