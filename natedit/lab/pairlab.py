"""A gateway pair in the lab: two natedit gateways with keepalived, conntrackd and Redis.

Topology (:data:`PAIR`, added to the lab's own; node ``gw`` becomes a plain switch:
its addresses go, ``br0`` is the inside bridge and ``br1``, holding ``out0``, the
outside one)::

    clients 10.0.0.11.. --- gw:br0 ---+--- ga in0 10.0.0.2   ga out0 198.51.100.3 ---+
                                      +--- gb in0 10.0.0.3   gb out0 198.51.100.4 ---+
                                                  ga sync0 === gb sync0           gw:br1
                                                192.168.255.1   .2                   |
                                                                   srv eth0 198.51.100.2

The virtual addresses are the lab's usual ones: 10.0.0.1 (the clients' default
gateway) and 198.51.100.1 (natedit's public address), moved by keepalived (VRRP,
unicast between the gateways, ``advert_int`` as given) in one sync group whose
notify script is ``deploy/keepalived/natedit-notify.sh``, the one shipped.
Each gateway runs redis-server (the standby's a replica of the active's, over the
sync link), conntrackd (FTFW over the sync link) and ``natedit run --follow
--state unix://.../redis.sock``; everything by PID, in the lab's temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import redis as labredis
from .netns import Bridge, Port, Route, Topology, Veth
from .procs import LabError, which
from .topology import Lab

REPO = Path(__file__).resolve().parents[2]
NOTIFY = REPO / "deploy" / "keepalived" / "natedit-notify.sh"
INSIDE_VIP = "10.0.0.1"
PUBLIC_VIP = "198.51.100.1"
REDIS_PORT = 6379
REQUIRED = ("keepalived", "conntrackd", "redis-server", "redis-cli", "nft")

PAIR = Topology(
    nodes=("ga", "gb"),
    bridges=(Bridge("gw", "br1"),),
    links=(
        Veth(Port("gw", "pa", bridge="br0"), Port("ga", "in0", "10.0.0.2/24")),
        Veth(Port("gw", "pb", bridge="br0"), Port("gb", "in0", "10.0.0.3/24")),
        Veth(Port("gw", "qa", bridge="br1"), Port("ga", "out0", "198.51.100.3/24")),
        Veth(Port("gw", "qb", bridge="br1"), Port("gb", "out0", "198.51.100.4/24")),
        Veth(Port("ga", "sync0", "192.168.255.1/30"), Port("gb", "sync0", "192.168.255.2/30")),
    ),
    routes=(Route("ga", "default", "198.51.100.2"), Route("gb", "default", "198.51.100.2")),
    forwarding=("ga", "gb"),
)


@dataclass(frozen=True)
class Side:
    node: str
    number: int
    inside: str
    outside: str
    sync: str
    peer_inside: str
    peer_outside: str
    peer_sync: str


SIDES = {
    "ga": Side("ga", 1, "10.0.0.2", "198.51.100.3", "192.168.255.1",
               "10.0.0.3", "198.51.100.4", "192.168.255.2"),
    "gb": Side("gb", 2, "10.0.0.3", "198.51.100.4", "192.168.255.2",
               "10.0.0.2", "198.51.100.3", "192.168.255.1"),
}


def missing() -> list[str]:
    return [f"{cmd} is missing" for cmd in REQUIRED if which(cmd) is None]


def make_switch(lab: Lab) -> None:
    """Node ``gw`` becomes the two bridges only (no address, no routing)."""
    lab.net.ip("gw", "addr", "flush", "dev", "br0")
    lab.net.ip("gw", "addr", "flush", "dev", "out0")
    lab.net.ip("gw", "link", "set", "out0", "master", "br1")
    lab.sysctl(lab.gw_ns, "net.ipv4.ip_forward", "0")


@dataclass
class PairGateway:
    """One gateway of the pair and the processes it runs."""

    lab: Lab
    side: Side
    dir: Path
    advert_int: float
    master_first: bool
    redis: labredis.RedisServer | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ns(self) -> str:
        return self.lab.node(self.side.node)

    @property
    def ready_file(self) -> Path:
        return self.dir / "natedit.ready"

    def ready(self) -> dict[str, object]:
        try:
            data = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def role(self) -> str | None:
        role = self.ready().get("role")
        return role if isinstance(role, str) else None

    def exec(self, *argv: str, check: bool = True) -> str:
        return self.lab.exec(self.ns, list(argv), check=check).stdout

    # -- starting ----------------------------------------------------------------------------

    def start(self) -> None:
        """Rules, Redis, conntrackd, natedit (following), keepalived."""
        self.dir.mkdir(parents=True, exist_ok=True)
        s = self.side
        # conntrackd does not carry TCP window tracking: the committed entries must not
        # make the peer's segments INVALID (then not NATed, and answered with a RST)
        self.lab.sysctl(self.ns, "net.netfilter.nf_conntrack_tcp_be_liberal", "1")
        self.exec("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "out0", "-j", "SNAT",
                  "--to-source", PUBLIC_VIP)
        replicaof = None if self.master_first else (s.peer_sync, REDIS_PORT)
        self.redis = labredis.start(self.lab.procs, self.dir / "redis", bind=s.sync,
                                    port=REDIS_PORT, replicaof=replicaof,
                                    prefix=self.lab.net.argv(self.ns, []))
        self.procs["redis"] = self.redis.proc
        self._conntrackd()
        self._natedit()
        self._keepalived()

    def _conntrackd(self) -> None:
        s = self.side
        conf = self.dir / "conntrackd.conf"
        conf.write_text(f"""Sync {{
    Mode FTFW {{
        DisableExternalCache Off
        StartupResync on
    }}
    UDP {{
        IPv4_address {s.sync}
        IPv4_Destination_Address {s.peer_sync}
        Port 3780
        Interface sync0
        Checksum on
    }}
}}
General {{
    HashSize 8192
    HashLimit 65536
    LogFile {self.dir}/conntrackd.log
    Syslog off
    LockFile {self.dir}/conntrackd.lock
    UNIX {{
        Path {self.dir}/conntrackd.ctl
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    Filter From Userspace {{
        Protocol Accept {{
            TCP
        }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address 192.168.255.0/30
        }}
    }}
}}
""")
        argv = self.lab.net.argv(self.ns, [which("conntrackd") or "conntrackd", "-C", str(conf)])
        self.procs["conntrackd"] = self.lab.procs.popen(argv, name=f"conntrackd-{s.node}")
        deadline = time.monotonic() + 5
        while not (self.dir / "conntrackd.ctl").exists():
            if self.procs["conntrackd"].poll() is not None or time.monotonic() > deadline:
                raise LabError(f"conntrackd did not start: "
                               f"{self.lab.procs.log(self.procs['conntrackd'])[-1000:]}")
            time.sleep(0.02)

    def conntrackd_cmd(self) -> str:
        return f"{which('conntrackd')} -C {self.dir}/conntrackd.conf"

    def _natedit(self) -> None:
        policy = self.dir / "policy.yaml"
        policy.write_text(f"""public_address: {PUBLIC_VIP}
inside_networks: [10.0.0.0/24]
call_ids:
  node: {self.side.number}
  nodes: 2
""")
        assert self.redis is not None
        argv = [sys.executable, "-m", "natedit", "run", "--follow", "--policy", str(policy),
                "--state", self.redis.url, "--ready-file", str(self.ready_file),
                "--pid-file", str(self.dir / "natedit.pid"), "--events-socket", ""]
        proc = self.lab.gateway_of(self.side.node).start_process(
            argv, ready=lambda: self.role is not None, cwd=str(REPO),
            name=f"natedit-{self.side.node}", timeout=20)
        self.procs["natedit"] = proc

    def _keepalived(self) -> None:
        s = self.side
        assert self.redis is not None
        env = self.dir / "pair.env"
        env.write_text(f"""NATEDIT="{sys.executable} -m natedit"
NATEDIT_READY={self.ready_file}
REDIS_CLI="{which('redis-cli')} -s {self.redis.socket}"
PEER_REDIS_HOST={s.peer_sync}
PEER_REDIS_PORT={REDIS_PORT}
CONNTRACKD="{self.conntrackd_cmd()}"
PROMOTE_WAIT=10
LOG={self.dir}/notify.log
""")
        state, priority = ("MASTER", 150) if self.master_first else ("BACKUP", 100)
        instances = []
        for name, vrid, dev, src, peer, vip in (
                ("inside", 51, "in0", s.inside, s.peer_inside, INSIDE_VIP),
                ("outside", 52, "out0", s.outside, s.peer_outside, PUBLIC_VIP)):
            instances.append(f"""vrrp_instance {name} {{
    state {state}
    interface {dev}
    virtual_router_id {vrid}
    priority {priority}
    advert_int {self.advert_int:g}
    unicast_src_ip {src}
    unicast_peer {{
        {peer}
    }}
    virtual_ipaddress {{
        {vip}/24 dev {dev}
    }}
}}
""")
        conf = self.dir / "keepalived.conf"
        version = "\n    vrrp_version 3" if self.advert_int < 1 else ""  # sub-second: VRRPv3
        conf.write_text(f"""global_defs {{
    router_id natedit-{s.node}{version}
    script_user root
    vrrp_garp_master_repeat 3
    vrrp_garp_master_delay 1
}}
vrrp_sync_group natedit {{
    group {{
        inside
        outside
    }}
    notify "{NOTIFY} {env}"
}}
""" + "\n".join(instances))
        argv = self.lab.net.argv(self.ns, [
            which("keepalived") or "keepalived", "--dont-fork", "--log-console", "--vrrp",
            "-f", str(conf), "-p", str(self.dir / "keepalived.pid"),
            "-r", str(self.dir / "vrrp.pid"), "-c", str(self.dir / "checkers.pid")])
        self.procs["keepalived"] = self.lab.procs.popen(
            argv, name=f"keepalived-{s.node}", group=True)

    # -- failures ------------------------------------------------------------------------------

    def kill(self) -> float:
        """SIGKILL every process of the gateway (by PID), then its links down; when."""
        pids = self.lab.pids_in(self.ns)
        for sig in (signal.SIGSTOP, signal.SIGKILL):  # stopped first: none reacts to the
            for pid in pids:  # others' death (keepalived's VRRP child would send priority 0)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if sig == signal.SIGSTOP:
                t = time.monotonic()
        for port in ("pa", "qa") if self.side.node == "ga" else ("pb", "qb"):
            self.lab.net.ip("gw", "link", "set", port, "down")
        self.lab.net.ip(self.side.node, "link", "set", "sync0", "down")
        return t

    def links_up(self) -> None:
        """Undo the links of :meth:`kill` (the gateway comes back)."""
        for port in ("pa", "qa") if self.side.node == "ga" else ("pb", "qb"):
            self.lab.net.ip("gw", "link", "set", port, "up")
        self.lab.net.ip(self.side.node, "link", "set", "sync0", "up")

    def log(self, name: str) -> str:
        return self.lab.procs.log(self.procs[name])

    def notify_log(self) -> str:
        try:
            return (self.dir / "notify.log").read_text()
        except OSError:
            return ""

    def metrics(self) -> str:
        code = ("import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                "'http://127.0.0.1:9723/metrics',timeout=3).read().decode())")
        return self.exec(sys.executable, "-c", code, check=False)


def metric(text: str, name: str, labels: str = "") -> float | None:
    """One sample of Prometheus text (``name{labels}``), or None."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return None
