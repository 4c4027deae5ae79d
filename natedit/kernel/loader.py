"""Building, loading, attaching and removing the tc-BPF program of the kernel datapath.

Build: gre.bpf.c is compiled on the target (Debian ``clang``, ``libbpf-dev``) at
the worker's start into a cache directory (``$NATEDIT_BPF_CACHE``, else
``/var/cache/natedit/bpf``), named by the hash of the source and of clang's
version: a second start reuses it, a changed source or compiler rebuilds.

Load: ``bpftool prog load ... pinmaps`` pins the program and its maps in a
per-worker directory ``<bpffs>/natedit/<pid>`` (the first bpffs of
/proc/self/mounts; none: one is mounted on /sys/fs/bpf, which under ``ip netns
exec`` is private to the worker's mount namespace). Attach: a clsact qdisc
(added when missing) and one cls_bpf direct-action filter, preference
:data:`PREF`, running that one pinned program on each interface: one set of
maps for all attachments.

Lifetime: :meth:`Attachment.remove` deletes the filters (and a clsact it added
that has no filter left) and the pins. A :class:`Guard` process does the same
when the worker is gone however it went (SIGKILL included), deleting a filter
only while it still runs this worker's program (by id); a later worker
replaces a leftover filter at the same preference; ``natedit cleanup``
(:func:`remove_leftovers`) removes natedit's filters and the pins of workers
that are gone. Every command goes through :mod:`natedit.host`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from .. import NateditError, host

SOURCE = Path(__file__).with_name("gre.bpf.c")
PROGRAM = "natedit_gre"
PREF = 1723
"""tc filter preference of natedit's filter on each interface."""
MAPS = ("natedit_in", "natedit_out")
CACHE_ENV = "NATEDIT_BPF_CACHE"
DEFAULT_CACHE = "/var/cache/natedit/bpf"
GUARD_SCRIPT = r"""trap '' INT TERM HUP; cat >/dev/null
pins=$0
for f in "$@"; do
  dev=${f%%:*}; rest=${f#*:}; id=${rest%%:*}; own=${rest#*:}
  tc filter show dev "$dev" ingress pref 1723 2>/dev/null | grep -q " id $id " &&
    tc filter del dev "$dev" ingress pref 1723 2>/dev/null
  left="$(tc filter show dev "$dev" ingress 2>/dev/null)"
  left="$left$(tc filter show dev "$dev" egress 2>/dev/null)"
  [ "$own" = 1 ] && [ -z "$left" ] && tc qdisc del dev "$dev" clsact 2>/dev/null
done
exec rm -rf "$pins"
"""
"""The guard: ignores a service stop's signals, waits for the worker's end of its stdin
to close, then removes the worker's filters (only while they run its program) and pins."""


class KernelDatapathUnavailable(NateditError):
    """``datapath: kernel`` cannot run here; the message names what is missing."""


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
"""linux/capability.h: tc filters; BPF before CAP_BPF (Linux 5.8); BPF."""
USE_USERSPACE = "(datapath: userspace works without it)"


def probe(status: str | None = None, can_load: Callable[[], tuple[bool, str]] | None = None
          ) -> None:
    """The start-up check of ``datapath: kernel``, before anything is built or loaded:
    raises KernelDatapathUnavailable, one line naming what is missing, when BPF is
    not permitted (capabilities) or this kernel cannot load a tc BPF program.

    ``status`` is /proc/self/status's text (read when None); ``can_load`` asks the
    kernel (libbpf's probe, :meth:`natedit.kernel.libbpf.Libbpf.can_load_tc_programs`).
    The clsact qdisc and cls_bpf are checked when the program is attached, still before
    the worker says it is ready (:meth:`Attachment.attach`).
    """
    missing = [name for name, bits in (("CAP_BPF (or CAP_SYS_ADMIN)", (CAP_BPF, CAP_SYS_ADMIN)),
                                       ("CAP_NET_ADMIN", (CAP_NET_ADMIN,)))
               if not any(host.has_capability(b, status) for b in bits)]
    if missing:
        raise KernelDatapathUnavailable(
            f"datapath kernel: BPF is not permitted: the worker lacks {' and '.join(missing)} "
            f"{USE_USERSPACE}")
    if can_load is None:
        from .libbpf import Libbpf

        can_load = Libbpf().can_load_tc_programs
    ok, why = can_load()
    if not ok:
        raise KernelDatapathUnavailable(
            f"datapath kernel: this kernel does not let natedit load a tc BPF program "
            f"(BPF_PROG_TYPE_SCHED_CLS: {why}; needs CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF "
            f"and BPF not locked down) {USE_USERSPACE}")


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def build(source: Path = SOURCE, cache: Path | None = None) -> Path:
    """The compiled object of ``source``, compiled now unless cached."""
    if not host.have("clang"):
        raise KernelDatapathUnavailable(
            "datapath kernel needs clang to build its BPF program (apt-get install clang "
            "libbpf-dev)")
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        raise KernelDatapathUnavailable(
            "datapath kernel needs libbpf-dev (bpf/bpf_helpers.h) to build its BPF program")
    text = source.read_bytes()
    version = host.run(["clang", "--version"]).splitlines()[0]
    digest = hashlib.sha256(text + version.encode()).hexdigest()[:16]
    out_dir = cache or _cache_dir()
    obj = out_dir / f"gre-{digest}.o"
    if obj.exists():
        return obj
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".gre-{digest}.{os.getpid()}.o"
    multiarch = Path("/usr/include") / f"{os.uname().machine}-linux-gnu"
    argv = ["clang", "-O2", "-g", "-Wall", "-target", "bpf", "-c", str(source), "-o", str(tmp)]
    if multiarch.is_dir():
        argv[1:1] = [f"-I{multiarch}"]
    try:
        host.run(argv)
    except host.HostError as exc:
        raise KernelDatapathUnavailable(
            f"datapath kernel: cannot build {source.name}: {exc}") from exc
    tmp.replace(obj)
    return obj


def bpffs() -> Path:
    """A mounted bpffs (mounting one on /sys/fs/bpf when there is none)."""
    for line in (host.read_text("/proc/self/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "bpf":
            return Path(parts[1])
    try:
        host.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])
    except host.HostError as exc:
        raise KernelDatapathUnavailable(f"datapath kernel needs a bpf filesystem: {exc}") from exc
    return Path("/sys/fs/bpf")


def find_interfaces(public: IPv4Address | tuple[IPv4Address, ...],
                    inside: tuple[IPv4Network, ...],
                    public_interface: str | None) -> list[str]:
    """The interfaces of the public addresses (or the policy's) and those routing the
    inside networks: where the program is attached."""
    names: list[str] = []
    publics = {str(a) for a in (public if isinstance(public, tuple) else (public,))}
    if public_interface is not None:
        names.append(public_interface)
    for link in json.loads(host.run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        if any(a.get("local") in publics for a in link.get("addr_info", [])):
            names.append(link["ifname"])
    for net in inside:  # routes inside the network (root), or covering it (match)
        routes = [r for sel in ("root", "match")
                  for r in json.loads(host.run(["ip", "-j", "-4", "route", "show", sel,
                                                str(net)]) or "[]")]
        for route in routes:
            dst = route.get("dst", "")
            if dst != "default" and "dev" in route and dst != "0.0.0.0/0":
                with contextlib.suppress(ValueError):
                    if IPv4Network(dst if "/" in dst else f"{dst}/32").overlaps(net):
                        names.append(route["dev"])
    return [n for n in dict.fromkeys(names) if n != "lo"]


class Guard:
    """The process that removes the worker's filters and pins once the worker is gone."""

    def __init__(self, pins: Path, filters: list[tuple[str, int, bool]]) -> None:
        args = [f"{dev}:{prog_id}:{int(own)}" for dev, prog_id, own in filters]
        self._proc = subprocess.Popen(
            ["sh", "-c", GUARD_SCRIPT, str(pins), *args], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def release(self) -> None:
        """The worker removed everything itself: let the guard go (it finds nothing)."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)


@dataclass
class Attachment:
    """The program loaded and pinned in ``pins``, attached to ``interfaces``."""

    pins: Path
    interfaces: list[str]
    prog_id: int = 0
    own_clsact: set[str] = field(default_factory=set)
    attached: list[str] = field(default_factory=list)
    guard: Guard | None = None

    def map_path(self, name: str) -> str:
        return str(self.pins / name)

    def attach(self) -> None:
        """Attach to every interface (after the maps are filled); then start the guard."""
        for dev in self.interfaces:
            qdiscs = json.loads(host.run(["tc", "-j", "qdisc", "show", "dev", dev]) or "[]")
            if not any(q.get("kind") == "clsact" for q in qdiscs):
                try:
                    host.run(["tc", "qdisc", "add", "dev", dev, "clsact"])
                except host.HostError as exc:
                    raise KernelDatapathUnavailable(
                        f"datapath kernel needs the clsact qdisc (sch_ingress, "
                        f"CONFIG_NET_SCH_INGRESS) on {dev}: {exc} {USE_USERSPACE}") from exc
                self.own_clsact.add(dev)
            try:
                host.run(["tc", "filter", "replace", "dev", dev, "ingress", "pref", str(PREF),
                          "handle", "1", "bpf", "object-pinned", str(self.pins / "prog"),
                          "direct-action"])
            except host.HostError as exc:
                raise KernelDatapathUnavailable(
                    f"datapath kernel needs cls_bpf (CONFIG_NET_CLS_BPF) on {dev}: "
                    f"{exc} {USE_USERSPACE}") from exc
            self.attached.append(dev)
        self.guard = Guard(self.pins, [(d, self.prog_id, d in self.own_clsact)
                                       for d in self.attached])

    def remove(self) -> list[str]:
        """Filters, a clsact natedit added, pins: gone. The trouble met, as lines."""
        trouble: list[str] = []
        # (a clsact added on an interface whose filter then failed goes too)
        for dev in dict.fromkeys([*self.attached, *sorted(self.own_clsact)]):
            try:
                if dev in self.attached:
                    host.run(["tc", "filter", "del", "dev", dev, "ingress", "pref", str(PREF)])
                if dev in self.own_clsact and not (
                        host.run(["tc", "filter", "show", "dev", dev, "ingress"]).strip()
                        or host.run(["tc", "filter", "show", "dev", dev, "egress"]).strip()):
                    host.run(["tc", "qdisc", "del", "dev", dev, "clsact"])
            except host.HostError as exc:
                trouble.append(str(exc))
        self.attached.clear()
        self.own_clsact.clear()
        shutil.rmtree(self.pins, ignore_errors=True)
        if self.guard is not None:
            self.guard.release()
            self.guard = None
        return trouble


def load(obj: Path, public: IPv4Address, interfaces: list[str],
         root: Path | None = None) -> Attachment:
    """Load ``obj``, pin program and maps in a per-worker directory; not attached yet."""
    if not interfaces:
        raise KernelDatapathUnavailable(
            "datapath kernel found no interface to attach to (public address or inside "
            "networks)")
    if not host.have("bpftool"):
        raise KernelDatapathUnavailable("datapath kernel needs bpftool (apt-get install bpftool)")
    base = (root or bpffs()) / "natedit"
    reclaim(base)
    pins = base / str(os.getpid())
    shutil.rmtree(pins, ignore_errors=True)
    pins.mkdir(parents=True)
    try:
        host.run(["bpftool", "prog", "load", str(obj), str(pins / "prog"), "type",
                  "classifier", "pinmaps", str(pins)])
        info = json.loads(host.run(["bpftool", "-j", "prog", "show", "pinned",
                                    str(pins / "prog")]))
    except host.HostError as exc:
        shutil.rmtree(pins, ignore_errors=True)
        raise KernelDatapathUnavailable(
            f"datapath kernel: BPF is not permitted or not supported here (needs CAP_BPF "
            f"and CAP_NET_ADMIN, or root): {exc}") from exc
    att = Attachment(pins, interfaces, prog_id=int(info["id"]))
    return att


def reclaim(base: Path) -> list[str]:
    """Remove the pin directories of workers that are gone; their names."""
    gone = []
    if base.is_dir():
        for d in base.iterdir():
            if d.name.isdigit() and not Path(f"/proc/{d.name}").exists():
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
    return gone


def natedit_filters() -> list[str]:
    """Interfaces whose ingress has natedit's filter (its program name at PREF)."""
    found = []
    for link in json.loads(host.run(["ip", "-j", "link", "show"]) or "[]"):
        dev = link["ifname"]
        try:
            text = host.run(["tc", "-j", "filter", "show", "dev", dev, "ingress", "pref",
                             str(PREF)])
        except host.HostError:
            continue
        for f in json.loads(text or "[]"):
            if f.get("options", {}).get("prog", {}).get("name") == PROGRAM:
                found.append(dev)
    return found


def remove_leftovers() -> None:
    """``natedit cleanup``: natedit's tc filters (left when the worker and its guard were
    both killed, e.g. a whole service cgroup: the program would go on translating from
    stale maps), a clsact qdisc left with no filter at all (natedit adds one where none
    is; an empty one does nothing), and the pins of workers that are gone."""
    if not host.have("tc"):
        return
    for dev in natedit_filters():
        with contextlib.suppress(host.HostError):
            host.run(["tc", "filter", "del", "dev", dev, "ingress", "pref", str(PREF)])
            if not (host.run(["tc", "filter", "show", "dev", dev, "ingress"]).strip()
                    or host.run(["tc", "filter", "show", "dev", dev, "egress"]).strip()):
                host.run(["tc", "qdisc", "del", "dev", dev, "clsact"])
    for line in (host.read_text("/proc/self/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "bpf":
            reclaim(Path(parts[1]) / "natedit")
