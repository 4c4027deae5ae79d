"""The kernel fast path (``datapath: kernel``): established calls' GRE in nftables.

Theory of operation
-------------------
With ``datapath: userspace`` every GRE packet is queued to the worker
(:mod:`natedit.rules`). With ``datapath: kernel`` the worker also keeps an
nftables table of its own, ``ip natedit_fast``, which translates the GRE of
established calls before the queue rules see it:

* maps ``in_daddr`` and ``in_cid`` take (server, public Call ID) to the
  client's address and Call ID; chain ``gre_in`` (prerouting, priority
  -301: before the raw table at -300) rewrites inbound GRE to the public
  address with both and exempts it from conntrack itself, before routing,
  so the private destination is the one routed and natedit's own raw and
  mangle rules, which look for the public address, pass it by cheaply;
* map ``out_saddr`` takes (client, server, server Call ID) to the public
  address; chain ``gre_out`` (forward, -200) rewrites the source of
  outbound GRE before the mangle table would queue it.

The rewrite is stateless: conntrack never sees GRE (the notrack rules of
:mod:`natedit.rules` stay), and the kernel fixes the IP header checksum
(enhanced GRE has none). A packet whose key is in no map goes on unchanged
to the queue rules, so the user-space path still handles everything else:
calls being set up, GRE that no call owns (dropped there as ``no_call``),
fragments, GRE that is not enhanced GRE v1. The control conversation is
always queued.

The call table stays the single source of truth. The core's events
(CallEstablished, CallReleased, ...) name the calls that changed; once per
turn of the worker's loop :meth:`KernelDatapath.flush` compares what the
table says for those calls (``Translator.gre_route``) with what it put in
the kernel (a mirror of the maps, exact because no other process can change
the table) and sends the difference as one nftables transaction. Each
element of ``in_daddr`` and ``out_saddr`` carries a counter:
:meth:`KernelDatapath.sync` reads them every :data:`SYNC_INTERVAL` seconds,
and again before an idle timer fires, and hands the new packets to the core
(``Translator.note_gre``), so calls stay alive while their GRE flows and
the GRE metrics count kernel-translated packets too. The counter of an
element about to be deleted is read first: no packet goes uncounted.

Lifetime. The worker talks to nftables through libnftables in its own
process (ctypes), and deletes the table when it stops. So that nothing is
left in the kernel after it exits however it exits (SIGKILL included), a
guard process (``sh``, ``cat``, ``nft``) waits for the end of a pipe the
worker holds and then deletes the table *by its handle* (a table created
later, by the next worker, has another handle and stays). The kernel's own
``owner`` flag would do the same, but nft 1.0.6 (Debian 12) corrupts its
heap printing any flagged table as JSON (``nft -j list ruleset`` aborts),
which would break every JSON user of the ruleset on the host while natedit
runs. The queue rules of a killed worker stay (fail-closed), as before.
Creating the table first deletes a leftover of the same name; ``natedit
cleanup`` deletes one too. A failed transaction is counted
(``fastpath_error``) and the whole table is rebuilt from the call table at
the next turn; while an element is missing, the queue translates that
call's GRE.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from . import (
    CallEstablished,
    CallMapped,
    CallReleased,
    Direction,
    Event,
    NateditError,
    Translator,
    wire,
)

log = logging.getLogger("natedit")

NFT_TABLE = "natedit_fast"
"""The table (family ip) of the kernel fast path; the worker that created it owns it."""
PRIORITY_IN = -301
"""Inbound: before raw (-300), so natedit's rules for the public address never see the
rewritten packet (the rule exempts it from conntrack itself, natively)."""
PRIORITY_OUT = -200
"""Outbound (forward): before mangle (-150), where natedit's queue rule would take it."""
SYNC_INTERVAL = 2.0
"""Seconds between two readings of the element counters (idle timers, metrics), at
least; longer with many calls (see SYNC_DUTY)."""
FRESH_BEFORE_TIMERS = 0.5
"""Counters older than this are read again before a due timer runs (see SYNC_DUTY)."""
SYNC_DUTY = 20
"""A reading costs about 17 us per call (10,000 calls: 0.2 s; 65,000: 2 s, listing and
parsing both maps): the next one comes no sooner than this many times its duration
later, so reading counters takes at most 1/SYNC_DUTY of the worker's time and the
control conversation is never held up for long. The resolution of idle timeouts is
then that interval (at 65,000 calls, about 45 s of 300)."""
REBUILD_BACKOFF = 5.0
"""Seconds before trying again after the table could not be rebuilt."""
ENHANCED_GRE = f"@th,0,32 & {wire.ENHANCED_GRE_MASK:#x} == {wire.ENHANCED_GRE_VALUE:#x}"
"""C=0 R=0 K=1, version 1, protocol PPP: what ``core.wire.is_pptp_gre`` accepts (the
same two numbers)."""
CALL_ID = f"@th,{wire.GRE_CALL_ID_AT * 8},16"
"""The GRE Call ID field, as nftables reads it (``core.wire.GRE_CALL_ID_AT``)."""
UNFRAGMENTED = "ip frag-off & 0x3fff == 0"
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4
GUARD_SCRIPT = ("trap '' INT TERM HUP; cat >/dev/null; "
                "exec nft delete table ip handle \"$0\" 2>/dev/null")
"""The guard: ignores the signals a service stop sends to every process of the
worker's group, waits for the worker's end of its stdin to close, deletes the table."""

InKey = tuple[bytes, int]
"""(server, public Call ID): inbound GRE to the public address."""
OutKey = tuple[bytes, bytes, int]
"""(client, server, server Call ID): outbound GRE."""
PublicKey = tuple[bytes, bytes, int]
"""(public address, server, public Call ID): the call table's own key."""


class FastPathError(NateditError):
    """nftables refused what the kernel fast path asked."""


class NftLike(Protocol):
    """What the fast path uses of :class:`Nft` (tests give a fake)."""

    def run(self, commands: str, *, json_output: bool = False,
            handles: bool = False) -> str: ...
    def close(self) -> None: ...


class Guard:
    """The process that deletes the table (by handle) once the worker is gone."""

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self._proc = subprocess.Popen(
            ["sh", "-c", GUARD_SCRIPT, str(handle)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def release(self) -> None:
        """The worker deleted the table itself: let the guard go (its delete fails)."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(2)


class Nft:
    """libnftables through ctypes: nft commands in this process, no ``nft`` process
    per transaction (about 60 us for a small one)."""

    def __init__(self, library: str | None = None) -> None:
        name = library or ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise FastPathError(
                f"datapath kernel needs libnftables ({exc}; Debian: apt-get install "
                "libnftables1)") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self._lib = lib
        self._ctx: int | None = lib.nft_ctx_new(0)
        if not self._ctx:
            raise FastPathError("libnftables: cannot create a context")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str, *, json_output: bool = False, handles: bool = False) -> str:
        """Run ``commands`` (nft -f syntax) as one transaction; their output."""
        if self._ctx is None:
            raise FastPathError("libnftables: context closed")
        lib = self._lib
        flags = (NFT_CTX_OUTPUT_JSON if json_output else 0) | (
            NFT_CTX_OUTPUT_HANDLE if handles else 0)
        lib.nft_ctx_output_set_flags(self._ctx, flags)
        rc = lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            raise FastPathError(f"nft: {lines[0] if lines else f'status {rc}'}"
                                + (f" ({lines[1][:160]})" if len(lines) > 1 else ""))
        return out

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def render_table(public_ip: bytes) -> str:
    """nft commands that (re)create the empty table, replacing a leftover."""
    public = socket.inet_ntoa(public_ip)
    t = NFT_TABLE
    return f"""table ip {t}
delete table ip {t}
table ip {t} {{
\tmap in_daddr {{
\t\ttypeof ip saddr . {CALL_ID} : ip daddr
\t\tcounter
\t}}
\tmap in_cid {{
\t\ttypeof ip saddr . {CALL_ID} : {CALL_ID}
\t}}
\tmap out_saddr {{
\t\ttypeof ip saddr . ip daddr . {CALL_ID} : ip saddr
\t\tcounter
\t}}
\tchain gre_in {{
\t\ttype filter hook prerouting priority {PRIORITY_IN}; policy accept;
\t\tip daddr {public} ip protocol gre {UNFRAGMENTED} {ENHANCED_GRE} \
ip daddr set ip saddr . {CALL_ID} map @in_daddr \
{CALL_ID} set ip saddr . {CALL_ID} map @in_cid notrack
\t}}
\tchain gre_out {{
\t\ttype filter hook forward priority {PRIORITY_OUT}; policy accept;
\t\tip protocol gre {UNFRAGMENTED} {ENHANCED_GRE} \
ip saddr set ip saddr . ip daddr . {CALL_ID} map @out_saddr
\t}}
}}
"""


REMOVAL = f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
"""Deletes the table whether or not it exists."""
_HANDLE = re.compile(rf"table ip {NFT_TABLE} {{ # handle (\d+)")


def _ip(packed: bytes) -> str:
    return socket.inet_ntoa(packed)


def in_key_text(key: InKey) -> str:
    return f"{_ip(key[0])} . {key[1]}"


def out_key_text(key: OutKey) -> str:
    return f"{_ip(key[0])} . {_ip(key[1])} . {key[2]}"


def element_lines(verb: str, map_name: str, items: list[str]) -> list[str]:
    """``add element ip natedit_fast <map> { ... }`` lines, a bounded number per line."""
    return [f"{verb} element ip {NFT_TABLE} {map_name} {{ {', '.join(items[i:i + 512])} }}"
            for i in range(0, len(items), 512)]


_COUNTER = re.compile(r"counter packets (\d+) bytes (\d+)")


def parse_map_counters(text: str) -> dict[tuple[Any, ...], tuple[int, int]]:
    """(key values) -> (packets, bytes) of each element of ``nft -j list map``."""
    out: dict[tuple[Any, ...], tuple[int, int]] = {}
    for obj in json.loads(text or '{"nftables": []}').get("nftables", []):
        body = obj.get("map")
        if not isinstance(body, dict):
            continue
        for item in body.get("elem", []):
            # a map element is [key, value]; a key with a counter is {"elem": {"val": key,
            # "counter": ...}}; a concatenated key is {"concat": [...]}
            first = item[0] if isinstance(item, list) and item else item
            elem = first.get("elem") if isinstance(first, dict) else None
            val = elem.get("val") if isinstance(elem, dict) else first
            counter = (elem.get("counter") if isinstance(elem, dict) else None) or {}
            key = tuple(val["concat"]) if isinstance(val, dict) and "concat" in val else (val,)
            out[key] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return out


class KernelDatapath:
    """Keeps ``ip natedit_fast`` equal to the established calls of ``translator``.

    Never raises from :meth:`note`, :meth:`flush` and :meth:`sync`: trouble is
    handed to ``report`` (the worker counts and logs it) and repaired by a rebuild.
    """

    def __init__(self, translator: Translator, *, nft: NftLike | None = None,
                 report: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 guard: Callable[[int], Guard] | None = Guard) -> None:
        self.translator = translator
        self.public_ip = translator.public_ip
        self.clock = clock
        self.report = report or (lambda what: log.error("kernel datapath: %s", what))
        self.nft: NftLike = nft if nft is not None else Nft()
        self._make_guard = guard
        self._guard: Guard | None = None
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
        """Successful nftables transactions."""
        self.packets = [0, 0]
        """GRE packets the kernel translated, by Direction (as counted so far)."""

    @property
    def calls(self) -> int:
        """Calls whose inbound GRE the kernel translates now."""
        return len(self._in)

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Create the table with every established call; raises FastPathError."""
        self._install()
        log.info("kernel datapath: table ip %s with %d calls", NFT_TABLE, len(self._in))

    def stop(self) -> None:
        """Read the last counters, then delete the table and close the socket."""
        try:
            self.sync(self.clock())
            self.nft.run(REMOVAL)
            self._set_guard(None)
            log.info("kernel datapath: table ip %s removed; the kernel translated %d outbound "
                     "and %d inbound GRE packets in %d transactions", NFT_TABLE,
                     self.packets[Direction.OUTBOUND], self.packets[Direction.INBOUND],
                     self.transactions)
        except FastPathError as exc:
            self.report(f"at stop: {exc}")
        finally:
            self.nft.close()
            self._in.clear()
            self._out.clear()

    def _set_guard(self, handle: int | None) -> None:
        old, self._guard = self._guard, None
        if old is not None:
            old.release()
        if handle is not None and self._make_guard is not None:
            self._guard = self._make_guard(handle)

    # -- the table follows the call table ------------------------------------------------

    def note(self, events: Iterable[Event]) -> None:
        """Remember which calls the events name; :meth:`flush` updates them."""
        for event in events:
            if not isinstance(event, CallEstablished | CallReleased | CallMapped):
                continue
            info = event.call
            server = info.server_address.packed
            self._dirty_in.add((server, info.public_call_id))
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
        tr, public = self.translator, self.public_ip
        del_in: list[InKey] = []
        add_in: list[tuple[InKey, tuple[bytes, int]]] = []
        for key in self._dirty_in:
            route = tr.gre_route((public, *key))
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
            self.nft.run(self._changes(del_in, add_in, del_out, add_out))
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

    def _changes(self, del_in: list[InKey], add_in: list[tuple[InKey, tuple[bytes, int]]],
                 del_out: list[OutKey], add_out: list[tuple[OutKey, PublicKey]]) -> str:
        lines: list[str] = []
        if del_in:
            keys = [in_key_text(k) for k in del_in]
            lines += element_lines("delete", "in_daddr", keys)
            lines += element_lines("delete", "in_cid", keys)
        if del_out:
            lines += element_lines("delete", "out_saddr", [out_key_text(k) for k in del_out])
        lines += self._add_lines(add_in, add_out)
        return "\n".join(lines) + "\n"

    def _add_lines(self, add_in: list[tuple[InKey, tuple[bytes, int]]],
                   add_out: list[tuple[OutKey, PublicKey]]) -> list[str]:
        lines: list[str] = []
        if add_in:
            lines += element_lines("add", "in_daddr",
                                   [f"{in_key_text(k)} : {_ip(v[0])}" for k, v in add_in])
            lines += element_lines("add", "in_cid",
                                   [f"{in_key_text(k)} : {v[1]}" for k, v in add_in])
        if add_out:
            lines += element_lines("add", "out_saddr",
                                   [f"{out_key_text(k)} : {_ip(o[0])}" for k, o in add_out])
        return lines

    def _install(self) -> None:
        """The table, created afresh, with every route of the call table."""
        add_in: list[tuple[InKey, tuple[bytes, int]]] = []
        add_out: list[tuple[OutKey, PublicKey]] = []
        for r in self.translator.gre_routes():
            if r.public_ip != self.public_ip:
                continue
            add_in.append(((r.server_ip, r.public_call_id), (r.client_ip, r.client_call_id)))
            if r.outbound:
                add_out.append(((r.client_ip, r.server_ip, r.server_call_id),
                                (r.public_ip, r.server_ip, r.public_call_id)))
        self.nft.run(render_table(self.public_ip))
        listed = self.nft.run(f"list table ip {NFT_TABLE}", handles=True)
        found = _HANDLE.search(listed)
        if found is None:
            raise FastPathError(f"no handle for table ip {NFT_TABLE} in {listed[:80]!r}")
        self._set_guard(int(found.group(1)))
        lines = self._add_lines(add_in, add_out)
        if lines:
            self.nft.run("\n".join(lines) + "\n")
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
                self.nft.run(REMOVAL)
            self._set_guard(None)
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
        tr, public = self.translator, self.public_ip
        if self._in:
            found = parse_map_counters(self.nft.run(
                f"list map ip {NFT_TABLE} in_daddr", json_output=True))
            for (server, cid), (packets, nbytes) in found.items():
                key = (socket.inet_aton(server), int(cid))
                self._count_in(tr, public, key, packets, nbytes, now)
        if self._out:
            found = parse_map_counters(self.nft.run(
                f"list map ip {NFT_TABLE} out_saddr", json_output=True))
            for (client, server, cid), (packets, nbytes) in found.items():
                okey = (socket.inet_aton(client), socket.inet_aton(server), int(cid))
                self._count_out(tr, okey, packets, nbytes, now)
        self.synced_at = now

    def _count_in(self, tr: Translator, public: bytes, key: InKey, packets: int, nbytes: int,
                  now: float) -> None:
        seen = self._in_seen.get(key)
        if seen is None or (packets, nbytes) == seen:
            return
        self._in_seen[key] = (packets, nbytes)
        dp, db = packets - seen[0], nbytes - seen[1]
        if dp > 0:
            self.packets[Direction.INBOUND] += dp
            tr.note_gre((public, *key), Direction.INBOUND, dp, db, now)

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
        commands = [f"get element ip {NFT_TABLE} in_daddr {{ {in_key_text(k)} }}"
                    for k in del_in]
        commands += [f"get element ip {NFT_TABLE} out_saddr {{ {out_key_text(k)} }}"
                     for k in del_out]
        found = _COUNTER.findall(self.nft.run("\n".join(commands) + "\n"))
        if len(found) != len(commands):
            raise FastPathError(f"read {len(found)} counters of {len(commands)} elements")
        now = self.clock()
        tr, public = self.translator, self.public_ip
        for key, (p, b) in zip(del_in, found[:len(del_in)], strict=True):
            self._count_in(tr, public, key, int(p), int(b), now)
        for okey, (p, b) in zip(del_out, found[len(del_in):], strict=True):
            self._count_out(tr, okey, int(p), int(b), now)


def remove_leftover() -> None:
    """Delete ``ip natedit_fast`` if it exists (``natedit cleanup``): a worker killed
    together with its guard may leave it. Without libnftables there is none."""
    try:
        nft = Nft()
    except FastPathError:
        return
    try:
        nft.run(REMOVAL)
    finally:
        nft.close()
