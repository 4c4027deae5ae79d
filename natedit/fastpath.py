"""The kernel fast path (``datapath: kernel``): established calls' GRE in tc-BPF.

Theory of operation
-------------------
With ``datapath: userspace`` every GRE packet is queued to the worker
(:mod:`natedit.rules`). With ``datapath: kernel`` the worker also runs a tc
ingress program (:mod:`natedit.kernel`: gre.bpf.c, built from source at
start, loaded, pinned and attached by :mod:`natedit.kernel.loader`) on the
public interface and the interfaces routing the inside networks. It
translates the GRE of established calls before the IP stack sees it, from
two hash maps the worker keeps:

* ``natedit_in`` takes (public address, server, public Call ID) to the
  client's address and Call ID (inbound GRE, to a public address: a gateway
  may have several);
* ``natedit_out`` takes (client, server, server Call ID) to the public
  address (outbound GRE).

A translated packet gets its TTL decremented and leaves by the interface
the routing table names (``bpf_fib_lookup``, ``bpf_redirect``): it meets
neither conntrack nor natedit's queue rules. A packet the program does not
own (key in no map, fragment, IP options, not enhanced GRE v1, TTL <= 1, no
route or neighbour, larger than the egress MTU) goes on unchanged to the
stack and the queue rules, so the user-space path still handles everything
else: calls being set up, GRE that no call owns (dropped there as
``no_call``), ICMP time-exceeded, fragmentation. The control conversation is
always queued. ``tcpdump`` on the gateway still sees the traffic: packet
taps run before tc ingress, and on the egress interface as it is sent.

The call table stays the single source of truth. The core's events
(CallEstablished, CallReleased, ...) name the calls that changed; once per
turn of the worker's loop :meth:`KernelDatapath.flush` compares what the
table says for those calls (``Translator.gre_route``) with what it put in
the kernel (a mirror of the maps, exact because no other process writes
them) and sends the difference, element by element through libbpf in this
process (:mod:`natedit.kernel.libbpf`, no process per change). Each element
carries packet and byte counters: :meth:`KernelDatapath.sync` reads them
every :data:`SYNC_INTERVAL` seconds, and again before an idle timer fires,
and hands the new packets to the core (``Translator.note_gre``), so calls
stay alive while their GRE flows and the GRE metrics count
kernel-translated packets too. The counters of an element about to be
deleted are read first: no packet goes uncounted.

Lifetime: see :mod:`natedit.kernel.loader` (filters and pins removed at
stop; after any other exit, SIGKILL included, by a guard process; a
restarted worker fills its maps from the restored call table before it
attaches). A failed update is counted (``fastpath_error``) and the program
and maps are rebuilt from the call table at the next turn; while an element
is missing, the queue translates that call's GRE.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from typing import Protocol

from . import (
    CallEstablished,
    CallMapped,
    CallReleased,
    Direction,
    Event,
    NateditError,
    Translator,
)

log = logging.getLogger("natedit")

SYNC_INTERVAL = 2.0
"""Seconds between two readings of the element counters (idle timers, metrics), at
least; longer with many calls (see SYNC_DUTY)."""
FRESH_BEFORE_TIMERS = 0.5
"""Counters older than this are read again before a due timer runs (see SYNC_DUTY)."""
SYNC_DUTY = 20
"""The next reading of the counters comes no sooner than this many times the last
one's duration later, so reading counters takes at most 1/SYNC_DUTY of the worker's
time and the control conversation is never held up for long."""
REBUILD_BACKOFF = 5.0
"""Seconds before trying again after the program and maps could not be rebuilt."""

InKey = tuple[bytes, bytes, int]
"""(public address, server, public Call ID): inbound GRE, and the call table's own key."""
OutKey = tuple[bytes, bytes, int]
"""(client, server, server Call ID): outbound GRE."""
PublicKey = tuple[bytes, bytes, int]
"""(public address, server, public Call ID): the call table's own key."""
Counts = tuple[int, int]
"""(packets, bytes) of one element."""


class FastPathError(NateditError):
    """The kernel refused what the kernel fast path asked (the message says what)."""


class MapsLike(Protocol):
    """The kernel side of the fast path: program and maps (tests give a fake)."""

    def create(self) -> None:
        """Load the program with empty maps (replacing what this worker had); not yet
        attached."""

    def attach(self) -> None:
        """Attach the program to the interfaces (once the maps are filled)."""

    def apply(self, del_in: list[InKey], add_in: list[tuple[InKey, tuple[bytes, int]]],
              del_out: list[OutKey], add_out: list[tuple[OutKey, bytes]]) -> None:
        """Delete, then add (fresh counters), the elements named."""

    def read_in(self) -> dict[InKey, Counts]: ...
    def read_out(self) -> dict[OutKey, Counts]: ...
    def get(self, in_keys: list[InKey], out_keys: list[OutKey]) -> tuple[
        list[Counts | None], list[Counts | None]]: ...
    def remove(self) -> None:
        """Detach and unload (nothing left in the kernel)."""

    def close(self) -> None: ...


class BpfMaps:
    """:class:`MapsLike` on the real kernel: natedit.kernel's program and maps."""

    def __init__(self, translator: Translator) -> None:
        from .kernel import libbpf, loader  # the toolchain is only needed for this datapath

        self._libbpf, self._loader = libbpf, loader
        policy = translator.policy
        self.publics = policy.public_addresses or (IPv4Address(translator.public_ip),)
        self._inside = policy.inside_networks
        self._public_interface = policy.public_interface
        self.interfaces: list[str] = []
        self._lib: libbpf.Libbpf | None = None
        self._att: loader.Attachment | None = None
        self._maps: dict[str, libbpf.Map] = {}

    def _wrap(self, exc: NateditError) -> FastPathError:
        return FastPathError(str(exc))

    def create(self) -> None:
        lb, ld = self._libbpf, self._loader
        self.remove()
        try:
            ld.probe()  # BPF permitted, tc programs loadable: else one line, nothing done
            obj = ld.build()
            self.interfaces = ld.find_interfaces(self.publics, self._inside,
                                                 self._public_interface)
            self._att = ld.load(obj, self.publics[0], self.interfaces)
            if self._lib is None:
                self._lib = lb.Libbpf()
            sizes = {"natedit_in": (lb.IN_KEY.size, lb.ROUTE.size),
                     "natedit_out": (lb.OUT_KEY.size, lb.ROUTE.size)}
            for name, (k, v) in sizes.items():
                self._maps[name] = lb.Map(self._lib, self._att.map_path(name), k, v)
        except NateditError as exc:
            self.remove()
            raise self._wrap(exc) from exc

    def attach(self) -> None:
        if self._att is None:
            raise FastPathError("kernel datapath: nothing loaded to attach")
        try:
            self._att.attach()
        except NateditError as exc:
            self.remove()
            raise self._wrap(exc) from exc

    def apply(self, del_in: list[InKey], add_in: list[tuple[InKey, tuple[bytes, int]]],
              del_out: list[OutKey], add_out: list[tuple[OutKey, bytes]]) -> None:
        lb = self._libbpf
        m_in, m_out = self._maps.get("natedit_in"), self._maps.get("natedit_out")
        if m_in is None or m_out is None:
            raise FastPathError("kernel datapath: maps not loaded")
        try:
            for key in del_in:
                m_in.delete(lb.pack_in_key(*key))
            for okey in del_out:
                m_out.delete(lb.pack_out_key(*okey))
            for key, (client, cid) in add_in:
                m_in.update(lb.pack_in_key(*key), lb.pack_route(client, cid))
            for okey, public in add_out:
                m_out.update(lb.pack_out_key(*okey), lb.pack_route(public, okey[2]))
        except NateditError as exc:
            raise self._wrap(exc) from exc

    def read_in(self) -> dict[InKey, Counts]:
        lb, m = self._libbpf, self._maps.get("natedit_in")
        if m is None:
            raise FastPathError("kernel datapath: maps not loaded")
        out: dict[InKey, Counts] = {}
        try:
            for k, v in m.items():
                public, server, cid = lb.IN_KEY.unpack(k)
                out[(public, server, cid)] = lb.unpack_route(v)[2:]
        except NateditError as exc:
            raise self._wrap(exc) from exc
        return out

    def read_out(self) -> dict[OutKey, Counts]:
        lb, m = self._libbpf, self._maps.get("natedit_out")
        if m is None:
            raise FastPathError("kernel datapath: maps not loaded")
        out: dict[OutKey, Counts] = {}
        try:
            for k, v in m.items():
                client, server, cid = lb.OUT_KEY.unpack(k)
                out[(client, server, cid)] = lb.unpack_route(v)[2:]
        except NateditError as exc:
            raise self._wrap(exc) from exc
        return out

    def get(self, in_keys: list[InKey], out_keys: list[OutKey]) -> tuple[
            list[Counts | None], list[Counts | None]]:
        lb = self._libbpf
        m_in, m_out = self._maps.get("natedit_in"), self._maps.get("natedit_out")
        if m_in is None or m_out is None:
            raise FastPathError("kernel datapath: maps not loaded")
        try:
            ins = [m_in.lookup(lb.pack_in_key(*k)) for k in in_keys]
            outs = [m_out.lookup(lb.pack_out_key(*k)) for k in out_keys]
        except NateditError as exc:
            raise self._wrap(exc) from exc
        return ([None if v is None else lb.unpack_route(v)[2:] for v in ins],
                [None if v is None else lb.unpack_route(v)[2:] for v in outs])

    def remove(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        att, self._att = self._att, None
        if att is not None:
            trouble = att.remove()
            if trouble:
                raise FastPathError(f"removing the tc filters: {trouble[0]}")

    def close(self) -> None:
        with contextlib.suppress(FastPathError):
            self.remove()


class KernelDatapath:
    """Keeps ``ip natedit_fast`` equal to the established calls of ``translator``.

    Never raises from :meth:`note`, :meth:`flush` and :meth:`sync`: trouble is
    handed to ``report`` (the worker counts and logs it) and repaired by a rebuild.
    """

    def __init__(self, translator: Translator, *, maps: MapsLike | None = None,
                 report: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.translator = translator
        self.public_ip = translator.public_ip
        self.clock = clock
        self.report = report or (lambda what: log.error("kernel datapath: %s", what))
        self.maps: MapsLike = maps if maps is not None else BpfMaps(translator)
        # mirrors of the kernel maps, and the counters last read from them
        self._in: dict[InKey, tuple[bytes, int]] = {}
        self._out: dict[OutKey, PublicKey] = {}
        """Outbound key -> the call (public key) its element translates for."""
        self._out_of: dict[PublicKey, OutKey] = {}
        self._in_seen: dict[InKey, tuple[int, int]] = {}
        self._out_seen: dict[OutKey, tuple[int, int]] = {}
        self._dirty_in: set[InKey] = set()
        self._dirty_out: set[OutKey] = set()
        self._broken = False
        self._retry_at = 0.0
        self.synced_at = float("-inf")
        self.next_sync = float("inf")
        self._sync_cost = 0.0
        """Seconds the last reading of the counters took."""
        self.transactions = 0
        """Successful batches of changes (one per turn at most)."""
        self.packets = [0, 0]
        """GRE packets the kernel translated, by Direction (as counted so far)."""

    @property
    def calls(self) -> int:
        """Calls whose inbound GRE the kernel translates now."""
        return len(self._in)

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Load the program, fill its maps with every established call, attach it;
        raises FastPathError (one line naming what is missing)."""
        self._install()
        log.info("kernel datapath: tc-BPF program attached to %s with %d calls",
                 ", ".join(getattr(self.maps, "interfaces", [])) or "?", len(self._in))

    def stop(self) -> None:
        """Read the last counters, then detach and unload program and maps."""
        try:
            self.sync(self.clock())
            self.maps.remove()
            log.info("kernel datapath: tc-BPF program removed; the kernel translated %d "
                     "outbound and %d inbound GRE packets in %d batches",
                     self.packets[Direction.OUTBOUND], self.packets[Direction.INBOUND],
                     self.transactions)
        except FastPathError as exc:
            self.report(f"at stop: {exc}")
        finally:
            self.close()

    def close(self) -> None:
        """Whatever is left goes (a start that failed half-way included)."""
        self.maps.close()
        self._in.clear()
        self._out.clear()
        self._out_of.clear()

    # -- the table follows the call table ------------------------------------------------

    def note(self, events: Iterable[Event]) -> None:
        """Remember which calls the events name; :meth:`flush` updates them."""
        for event in events:
            if not isinstance(event, CallEstablished | CallReleased | CallMapped):
                continue
            info = event.call
            server = info.server_address.packed
            self._dirty_in.add((info.public_address.packed, server, info.public_call_id))
            if info.server_call_id is not None:
                self._dirty_out.add((info.client_address.packed, server, info.server_call_id))
            old = self._out_of.get((info.public_address.packed, server, info.public_call_id))
            if old is not None:
                self._dirty_out.add(old)

    def flush(self) -> None:
        """Send what changed since the last turn, in one transaction."""
        if self._broken:
            if self.clock() >= self._retry_at:
                self._rebuild()
            return
        if not self._dirty_in and not self._dirty_out:
            return
        tr = self.translator
        del_in: list[InKey] = []
        add_in: list[tuple[InKey, tuple[bytes, int]]] = []
        for key in self._dirty_in:
            route = tr.gre_route(key)
            want = None if route is None else (route.client_ip, route.client_call_id)
            have = self._in.get(key)
            if want == have:
                continue
            if have is not None:
                del_in.append(key)
            if want is not None:
                add_in.append((key, want))
        del_out: list[OutKey] = []
        add_out: list[tuple[OutKey, PublicKey]] = []
        for okey in self._dirty_out:
            route = tr.gre_route_outbound(okey)
            owner = (None if route is None
                     else (route.public_ip, route.server_ip, route.public_call_id))
            had = self._out.get(okey)
            if owner == had:
                continue
            if had is not None:
                del_out.append(okey)
            if owner is not None:
                add_out.append((okey, owner))
        self._dirty_in.clear()
        self._dirty_out.clear()
        if not (del_in or add_in or del_out or add_out):
            return
        try:
            if del_in or del_out:
                self._harvest(del_in, del_out)
            self.maps.apply(del_in, add_in, del_out, [(k, o[0]) for k, o in add_out])
        except FastPathError as exc:
            self.report(f"update failed, rebuilding the table: {exc}")
            self._broken = True
            self._rebuild()
            return
        self.transactions += 1
        for key in del_in:
            del self._in[key]
            self._in_seen.pop(key, None)
        for key, value in add_in:
            self._in[key] = value
            self._in_seen[key] = (0, 0)
        for okey in del_out:
            self._out_of.pop(self._out.pop(okey), None)
            self._out_seen.pop(okey, None)
        for okey, owner in add_out:
            self._out[okey] = owner
            self._out_of[owner] = okey
            self._out_seen[okey] = (0, 0)

    def _install(self) -> None:
        """The table, created afresh, with every route of the call table."""
        add_in: list[tuple[InKey, tuple[bytes, int]]] = []
        add_out: list[tuple[OutKey, PublicKey]] = []
        for r in self.translator.gre_routes():
            add_in.append(((r.public_ip, r.server_ip, r.public_call_id),
                           (r.client_ip, r.client_call_id)))
            if r.outbound:
                add_out.append(((r.client_ip, r.server_ip, r.server_call_id),
                                (r.public_ip, r.server_ip, r.public_call_id)))
        self.maps.create()
        if add_in or add_out:
            self.maps.apply([], add_in, [], [(k, o[0]) for k, o in add_out])
        self.maps.attach()  # the restored calls are in before the first packet
        self.transactions += 1
        self._in = dict(add_in)
        self._out = dict(add_out)
        self._out_of = {owner: okey for okey, owner in add_out}
        self._in_seen = dict.fromkeys(self._in, (0, 0))
        self._out_seen = dict.fromkeys(self._out, (0, 0))
        self._dirty_in.clear()
        self._dirty_out.clear()
        self._broken = False
        now = self.clock()
        self.synced_at = now
        self.next_sync = now + SYNC_INTERVAL

    def _rebuild(self) -> None:
        with contextlib.suppress(FastPathError):
            self._read_counters(self.clock())
        try:
            self._install()
        except FastPathError as exc:
            self.report(f"cannot rebuild the table, GRE goes through the queues: {exc}")
            with contextlib.suppress(FastPathError):
                self.maps.remove()
            self._in.clear()
            self._out.clear()
            self._out_of.clear()
            self._broken = True
            self._retry_at = self.clock() + REBUILD_BACKOFF

    # -- counters ------------------------------------------------------------------------

    def stale(self, now: float) -> bool:
        """Whether the counters should be read before a due timer runs."""
        age = now - self.synced_at
        return age > FRESH_BEFORE_TIMERS and age > self._sync_cost * SYNC_DUTY

    def sync(self, now: float) -> None:
        """Hand the packets the kernel translated since the last reading to the core."""
        if self._broken:
            self.next_sync = now + SYNC_INTERVAL
            return
        started = time.perf_counter()
        try:
            self._read_counters(now)
        except FastPathError as exc:
            self.report(f"cannot read the counters: {exc}")
        self._sync_cost = time.perf_counter() - started
        self.next_sync = now + max(SYNC_INTERVAL, self._sync_cost * SYNC_DUTY)

    def _read_counters(self, now: float) -> None:
        if not self._in and not self._out:
            self.synced_at = now
            return
        tr = self.translator
        if self._in:
            for key, (packets, nbytes) in self.maps.read_in().items():
                self._count_in(tr, key, packets, nbytes, now)
        if self._out:
            for okey, (packets, nbytes) in self.maps.read_out().items():
                self._count_out(tr, okey, packets, nbytes, now)
        self.synced_at = now

    def _count_in(self, tr: Translator, key: InKey, packets: int, nbytes: int,
                  now: float) -> None:
        seen = self._in_seen.get(key)
        if seen is None or (packets, nbytes) == seen:
            return
        self._in_seen[key] = (packets, nbytes)
        dp, db = packets - seen[0], nbytes - seen[1]
        if dp > 0:
            self.packets[Direction.INBOUND] += dp
            tr.note_gre(key, Direction.INBOUND, dp, db, now)

    def _count_out(self, tr: Translator, okey: OutKey, packets: int, nbytes: int,
                   now: float) -> None:
        seen = self._out_seen.get(okey)
        owner = self._out.get(okey)
        if seen is None or owner is None or (packets, nbytes) == seen:
            return
        self._out_seen[okey] = (packets, nbytes)
        dp, db = packets - seen[0], nbytes - seen[1]
        if dp > 0:
            self.packets[Direction.OUTBOUND] += dp
            tr.note_gre(owner, Direction.OUTBOUND, dp, db, now)

    def _harvest(self, del_in: list[InKey], del_out: list[OutKey]) -> None:
        """Count what the elements about to be deleted translated since the last sync."""
        found_in, found_out = self.maps.get(del_in, del_out)
        now = self.clock()
        tr = self.translator
        for key, counts in zip(del_in, found_in, strict=True):
            if counts is not None:
                self._count_in(tr, key, counts[0], counts[1], now)
        for okey, oc in zip(del_out, found_out, strict=True):
            if oc is not None:
                self._count_out(tr, okey, oc[0], oc[1], now)


def remove_leftover() -> None:
    """``natedit cleanup``: natedit's tc filters, and the pins of workers that are gone
    (a worker killed together with its guard may leave them)."""
    from .kernel import loader

    with contextlib.suppress(NateditError):
        loader.remove_leftovers()
