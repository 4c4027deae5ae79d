"""The ownership sets: which GRE is natedit's, kept in the kernel equal to the call table.

Theory of operation
-------------------
:mod:`natedit.rules` claims GRE for the queues only when its key is in one of
the sets of table ``ip natedit``, all four derived from the call table's
indexes:

* ``own_in`` (public address . server . public Call ID): the keys of
  ``by_public``, exact: the server's GRE to a call's public Call ID.
* ``own_out`` (client . server . server Call ID): the keys of ``by_server``,
  exact: a natedit client's GRE is exempt from conntrack, and the safety
  net drops it should it leave with the client's address.
* ``own_server`` (server . server Call ID): the (server, Call ID) part of
  those keys. Outbound GRE from any inside address to a natedit call's
  server Call ID is claimed, so that the core drops a spoofed source
  (``no_call``) instead of the kernel masquerading it into that call.
* ``own_peer`` (server . public address): the (server, public address) part
  of the ``by_public`` keys. Inbound GRE from a natedit call's server to
  that public address with a Call ID no call has (a late packet of a call
  that just ended, a spoofed one) is claimed and dropped as ``no_call``:
  left to conntrack it would get the gateway's ICMP protocol-unreachable,
  which reaches every pptpd GRE socket toward the public address on that
  server, and pptpd would end all its calls with the gateway. (The
  gateway's own PPTP client is a natedit client: its calls are in
  ``own_in``.)

Every other GRE takes the path it would take without natedit (GRE of calls
natedit never saw from servers it has no call with, of a pptpd on the
gateway, to other servers, of other clients). The call table stays the
single source of truth: :class:`Ownership` only mirrors it (the exact keys,
and how many of them name each own_server or own_peer element, which goes
with the last).

* At start, :meth:`Ownership.start` reads every key of the (restored) table;
  :func:`natedit.rules.install` creates the sets with them in the same
  transaction that creates the table, so no restored call is ever
  unclaimed.
* The core's events (CallMapped, CallEstablished, CallReleased) name the
  calls that changed; :meth:`note` remembers their keys, :meth:`flush`
  compares the table with the mirror for just those keys and sends the
  difference as one nftables transaction (nf_tables netlink batches from this
  process, :mod:`natedit.nftset`: 8 us, where libnftables, which reads the
  ruleset into its cache each time, took 290 us on a gateway with
  iptables-nft tables).
* The worker flushes at the end of each turn of its loop, and also *before
  the verdict* of a packet whose events changed the table: a new call's keys
  are in the kernel before the Outgoing-Call-Request reaches the server and
  before the Outgoing-Call-Reply reaches the client (whose GRE may follow at
  once).
* A failed transaction is reported (``ownership_error``) and the sets are
  rebuilt from the whole table at the next flush (flush the sets, add every
  element: one transaction); while one fails, the mirror is not trusted.

The sets are part of the rules, not of the worker's life: they stay when the
worker stops or dies without removing its rules (a crash, a restart), so
natedit's calls stay claimed (fail-closed) while no worker is bound.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from . import CallEstablished, CallMapped, CallReleased, Event, rules
from .nftlib import NftError, NftLike
from .nftset import SetElements, SetError, key

Op = tuple[str, str, list["Key | Pair"]]
"""("add" | "delete" | "flush", set name, elements)."""

log = logging.getLogger("natedit")

Key = tuple[bytes, bytes, int]
"""by_public: (public address, server, public Call ID); by_server: (client, server,
server Call ID); addresses packed, as the call table keys them."""
Pair = tuple[bytes, int] | tuple[bytes, bytes]
"""own_server's element: (server, server Call ID); own_peer's: (server, public address)."""
BATCH = 512
"""Elements per ``add element`` line."""


class CallTableLike(Protocol):
    @property
    def by_public(self) -> Mapping[Key, object]: ...
    @property
    def by_server(self) -> Mapping[Key, object]: ...


class TranslatorLike(Protocol):
    @property
    def table(self) -> CallTableLike: ...


def _address(value: bytes | int) -> str:
    return socket.inet_ntoa(value) if isinstance(value, bytes) else str(value)


def key_text(key: Key | Pair) -> str:
    """An element as nft reads it: ``198.51.100.1 . 198.51.100.2 . 4660``."""
    return " . ".join(_address(part) for part in key)


def server(key: Key) -> Pair:
    """own_server's element of a by_server key."""
    return (key[1], key[2])


def peer(key: Key) -> Pair:
    """own_peer's element of a by_public key."""
    return (key[1], key[0])


def _key(k: Key | Pair) -> bytes:
    """An element's bytes as nf_tables compares them (:func:`natedit.nftset.key`)."""
    if len(k) == 3:
        return key(k[0], k[1], k[2].to_bytes(2, "big"))
    last = k[1]
    return key(k[0], last if isinstance(last, bytes) else last.to_bytes(2, "big"))


def element_lines(verb: str, name: str, keys: Iterable[Key | Pair]) -> list[str]:
    items = [key_text(k) for k in sorted(keys)]
    return [f"{verb} element ip {rules.NFT_TABLE} {name} {{ {', '.join(items[i:i + BATCH])} }}"
            for i in range(0, len(items), BATCH)]


class _Mirror:
    """One index of the call table as the kernel has it: the exact keys, and (when it
    has one) the projected set's elements with how many keys name each."""

    def __init__(self, exact: str, projected: str | None = None,
                 project: Callable[[Key], Pair] = server) -> None:
        self.exact = exact
        self.projected = projected
        """The set of the projections (None: none)."""
        self.project = project
        self.keys: set[Key] = set()
        self.counts: Counter[Pair] = Counter()
        self.dirty: set[Key] = set()

    def _count(self, keys: Iterable[Key]) -> Counter[Pair]:
        return Counter() if self.projected is None else Counter(map(self.project, keys))

    def load(self, keys: Iterable[Key]) -> None:
        self.keys = set(keys)
        self.counts = self._count(self.keys)
        self.dirty.clear()

    def changes(self, now: Mapping[Key, object]) -> tuple[list[Op], Callable[[], None]]:
        """nft lines for the dirty keys against ``now``, and what makes them the mirror's.
        The work is that of the dirty keys, not of the table: a batch that sets up one
        call costs the same with 10 calls up as with 60,000."""
        add = {k for k in self.dirty if k in now} - self.keys
        gone = {k for k in self.dirty if k not in now} & self.keys
        self.dirty.clear()
        lines: list[Op] = [("delete", self.exact, sorted(gone))]
        delta: Counter[Pair] = Counter()
        if self.projected is not None:
            delta.update(map(self.project, add))
            delta.subtract(map(self.project, gone))
            counts = self.counts
            lines.append(("delete", self.projected, sorted(
                p for p, d in delta.items() if counts[p] > 0 and counts[p] + d <= 0)))
        lines.append(("add", self.exact, sorted(add)))
        if self.projected is not None:
            lines.append(("add", self.projected, sorted(
                p for p, d in delta.items() if counts[p] <= 0 and counts[p] + d > 0)))
        lines = [op for op in lines if op[2]]

        def commit() -> None:
            self.keys -= gone
            self.keys |= add
            for p, d in delta.items():
                n = self.counts[p] + d
                if n > 0:
                    self.counts[p] = n
                else:
                    self.counts.pop(p, None)  # (no element at zero)

        return lines, commit

    def rebuild(self, now: Mapping[Key, object]) -> tuple[list[Op], Callable[[], None]]:
        keys = set(now)
        counts = self._count(keys)
        names = [self.exact] + ([] if self.projected is None else [self.projected])
        lines: list[Op] = [("flush", name, []) for name in names]
        lines.append(("add", self.exact, sorted(keys)))
        if self.projected is not None:
            lines.append(("add", self.projected, sorted(counts)))

        def commit() -> None:
            self.keys, self.counts = keys, counts
            self.dirty.clear()

        return lines, commit


class Ownership:
    """Keeps the ownership sets equal to the call table of ``translator``.

    Never raises from :meth:`note` and :meth:`flush`: trouble goes to ``report``
    (the worker counts and logs it) and is repaired by a rebuild.
    """

    def __init__(self, translator: TranslatorLike, *, nft: NftLike | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        self.translator = translator
        self._nft = nft
        """Where the transactions go as nft commands (tests); None: nf_tables netlink
        batches (:mod:`natedit.nftset`, no ruleset cache to read)."""
        self._sets: SetElements | None = None
        self.report = report or (lambda what: log.error("ownership sets: %s", what))
        self._in = _Mirror(rules.OWN_IN, rules.OWN_PEER, peer)
        self._out = _Mirror(rules.OWN_OUT, rules.OWN_SERVER, server)
        self._broken = False
        self.transactions = 0
        """Successful nftables transactions (the install's not counted)."""

    def _send(self, ops: list[Op]) -> None:
        """One transaction; raises NftError, SetError or OSError."""
        if self._nft is not None:
            lines: list[str] = []
            for verb, name, keys in ops:
                lines += ([f"flush set ip {rules.NFT_TABLE} {name}"] if verb == "flush"
                          else element_lines(verb, name, keys))
            self._nft.run("\n".join(lines) + "\n")
            return
        if self._sets is None:
            self._sets = SetElements(rules.NFT_TABLE)
        self._sets.apply([(verb == "add", name, None if verb == "flush" else map(_key, keys))
                          for verb, name, keys in ops])

    @property
    def owned(self) -> dict[str, int]:
        """Elements per set, as the kernel has them."""
        return {rules.OWN_IN: len(self._in.keys), rules.OWN_OUT: len(self._out.keys),
                rules.OWN_SERVER: len(self._out.counts), rules.OWN_PEER: len(self._in.counts)}

    def start(self) -> rules.Owned:
        """Every element for the table now (the sets :func:`rules.install` creates); opens
        the netlink socket (raises OSError without one)."""
        if self._nft is None and self._sets is None:
            self._sets = SetElements(rules.NFT_TABLE)
        table = self.translator.table
        self._in.load(table.by_public)
        self._out.load(table.by_server)
        self._broken = False
        return rules.Owned(tuple(map(key_text, sorted(self._in.keys))),
                           tuple(map(key_text, sorted(self._out.keys))),
                           tuple(map(key_text, sorted(self._out.counts))),
                           tuple(map(key_text, sorted(self._in.counts))))

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
        if self._sets is not None:
            self._sets.close()
            self._sets = None

    # -- following the table --------------------------------------------------------------

    def note(self, events: Iterable[Event]) -> None:
        """Remember the keys of the calls the events name; :meth:`flush` settles them."""
        for event in events:
            if not isinstance(event, CallMapped | CallEstablished | CallReleased):
                continue
            info = event.call
            srv = info.server_address.packed
            self._in.dirty.add((info.public_address.packed, srv, info.public_call_id))
            if info.server_call_id is not None:
                self._out.dirty.add((info.client_address.packed, srv, info.server_call_id))

    @property
    def pending(self) -> bool:
        return bool(self._in.dirty or self._out.dirty or self._broken)

    def flush(self) -> None:
        """Send what changed for the noted keys, in one transaction (or rebuild)."""
        if self._broken:
            self._rebuild()
            return
        if not self._in.dirty and not self._out.dirty:
            return
        table = self.translator.table
        lines_in, commit_in = self._in.changes(table.by_public)
        lines_out, commit_out = self._out.changes(table.by_server)
        if not lines_in and not lines_out:
            return
        try:
            self._send(lines_in + lines_out)
        except (NftError, SetError, OSError) as exc:
            self.report(f"update failed, rebuilding the sets: {exc}")
            self._broken = True
            self._rebuild()
            return
        self.transactions += 1
        commit_in()
        commit_out()

    def _rebuild(self) -> None:
        table = self.translator.table
        lines_in, commit_in = self._in.rebuild(table.by_public)
        lines_out, commit_out = self._out.rebuild(table.by_server)
        try:
            self._send(lines_in + lines_out)
        except (NftError, SetError, OSError) as exc:
            self.report(f"cannot rebuild the sets (trying again next turn): {exc}")
            return
        self.transactions += 1
        commit_in()
        commit_out()
        self._broken = False


class OwnershipCollector:
    """The metric family of the ownership sets."""

    def __init__(self, ownership: Ownership | None) -> None:
        self.ownership = ownership

    def collect(self) -> Iterator[Metric]:
        owned = GaugeMetricFamily(
            "natedit_owned_keys",
            "Elements in the kernel's ownership sets (own_in: public address, server, "
            "public Call ID; own_out: client, server, server Call ID; own_server: server, "
            "server Call ID; own_peer: server, public address): the GRE natedit claims.",
            labels=["set"])
        counts = {} if self.ownership is None else self.ownership.owned
        for name in (rules.OWN_IN, rules.OWN_OUT, rules.OWN_SERVER, rules.OWN_PEER):
            owned.add_metric([name], counts.get(name, 0))
        yield owned
