"""Other PPTP (and GRE) on and through the gateway: the lab's topologies for issue 16.

The lab's server namespace ``srv`` doubles as the Internet: :data:`INTERNET` gives it
a bridge ``inet0`` (203.0.113.1/24) and forwarding, so outside nodes hang off it and
reach the gateway's public address through it. On top of the lab (:func:`lab_topology`)::

    <p>-oc1 203.0.113.11 -+
    <p>-oc2 203.0.113.12 -+- <p>-srv inet0 203.0.113.1 (router) ... gw out0 198.51.100.1
    <p>-rnat 203.0.113.13 +          (eth0 198.51.100.2, pptpd)
        rbr0 192.168.77.1/24 -- <p>-rc1 .11, <p>-rc2 .12   (a remote NAT: MASQUERADE +
                                                           the kernel's PPTP helper)
    <p>-isrv eth0 10.1.0.50/24 -- gw dmz0 10.1.0.1/24      (an inside server, in a DMZ)

:func:`port_forward` is what an operator writes to publish the inside server:
DNAT of TCP 1723 and of GRE from the public address to it, and SNAT of its GRE to
inside clients to the public address (hairpin: an inside client calling the
public address gets the server's GRE from the address it called).
"""

from __future__ import annotations

from .gateway import PPTP_PORT, Gateway
from .netns import Bridge, Port, Route, Topology, Veth

INTERNET_ROUTER_ADDR = "203.0.113.1"
INTERNET_PREFIXLEN = 24
INTERNET_IF = "inet0"
OUTSIDE_CLIENTS = {"oc1": "203.0.113.11", "oc2": "203.0.113.12"}
"""Outside PPTP clients, each on an address of its own."""
REMOTE_NAT = "rnat"
REMOTE_NAT_ADDR = "203.0.113.13"
REMOTE_NAT_OUTSIDE_IF = "out0"
REMOTE_INSIDE_GW = "192.168.77.1"
REMOTE_CLIENTS = {"rc1": "192.168.77.11", "rc2": "192.168.77.12"}
"""Clients behind one remote NAT: the gateway sees both on REMOTE_NAT_ADDR."""
INSIDE_SERVER = "isrv"
INSIDE_SERVER_ADDR = "10.1.0.50"
DMZ_GW_ADDR = "10.1.0.1"
DMZ_IF = "dmz0"

INTERNET = Topology(
    nodes=(),
    bridges=(Bridge("srv", INTERNET_IF, f"{INTERNET_ROUTER_ADDR}/{INTERNET_PREFIXLEN}"),),
    forwarding=("srv",),
)


def outside_clients(*names: str) -> Topology:
    """Outside nodes on the Internet bridge (names of :data:`OUTSIDE_CLIENTS`)."""
    return Topology(
        nodes=names,
        links=tuple(
            Veth(Port("srv", f"i{name}", bridge=INTERNET_IF),
                 Port(name, "eth0", f"{OUTSIDE_CLIENTS[name]}/{INTERNET_PREFIXLEN}"))
            for name in names
        ),
        routes=tuple(Route(name, "default", INTERNET_ROUTER_ADDR) for name in names),
    )


REMOTE_NAT_SITE = Topology(
    nodes=(REMOTE_NAT, *REMOTE_CLIENTS),
    bridges=(Bridge(REMOTE_NAT, "rbr0", f"{REMOTE_INSIDE_GW}/24"),),
    links=(
        Veth(Port("srv", "irnat", bridge=INTERNET_IF),
             Port(REMOTE_NAT, REMOTE_NAT_OUTSIDE_IF, f"{REMOTE_NAT_ADDR}/{INTERNET_PREFIXLEN}")),
        *(Veth(Port(REMOTE_NAT, f"p{name}", bridge="rbr0"), Port(name, "eth0", f"{addr}/24"))
          for name, addr in REMOTE_CLIENTS.items()),
    ),
    routes=(Route(REMOTE_NAT, "default", INTERNET_ROUTER_ADDR),
            *(Route(name, "default", REMOTE_INSIDE_GW) for name in REMOTE_CLIENTS)),
    forwarding=(REMOTE_NAT,),
)

DMZ_SERVER = Topology(
    nodes=(INSIDE_SERVER,),
    links=(Veth(Port("gw", DMZ_IF, f"{DMZ_GW_ADDR}/24"),
                Port(INSIDE_SERVER, "eth0", f"{INSIDE_SERVER_ADDR}/24")),),
    routes=(Route(INSIDE_SERVER, "default", DMZ_GW_ADDR),),
)

PORT_FORWARD_LAB = INTERNET + outside_clients(*OUTSIDE_CLIENTS) + REMOTE_NAT_SITE + DMZ_SERVER
"""Issue 16 item 2: outside clients (two on addresses of their own, two behind one
remote NAT) calling an inside server published on the gateway's public address."""

GATEWAY_PPTP_LAB = INTERNET + outside_clients("oc1")
"""Issue 16 item 3: an outside client calling a pptpd on the gateway itself."""


def port_forward(gateway: Gateway, public: str, server: str = INSIDE_SERVER_ADDR,
                 inside: str = "10.0.0.0/8") -> None:
    """Publish a PPTP server behind the gateway: DNAT of TCP 1723 and GRE, hairpin SNAT.

    Without the kernel's helper, conntrack cannot pair the two directions of a call's
    GRE (it keys version 1 by Call ID, and each direction carries the other side's), so
    each direction is a connection of its own: the clients' GRE is DNATed by the
    second rule, the server's leaves through MASQUERADE (to the outside) or the SNAT
    below (to inside clients that called the public address).
    """
    gateway.iptables("-t", "nat", "-A", "PREROUTING", "-d", public, "-p", "tcp",
                     "--dport", str(PPTP_PORT), "-j", "DNAT", "--to-destination", server)
    gateway.iptables("-t", "nat", "-A", "PREROUTING", "-d", public, "-p", "gre",
                     "-j", "DNAT", "--to-destination", server)
    gateway.iptables("-t", "nat", "-A", "POSTROUTING", "-s", server, "-d", inside,
                     "-p", "gre", "-j", "SNAT", "--to-source", public)
