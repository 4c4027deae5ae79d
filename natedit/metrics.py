"""Prometheus metrics and the live call listing, read from the worker at scrape time.

Theory of operation
-------------------
Nothing here is on the per-packet path. The translator already counts what
it decides (:class:`natedit.Stats`, per call GRE counters) and
the call table is the single source of truth of calls; the worker counts its
own trouble (``Dispatcher.counts``); the kernel counts its queues in
``/proc/net/netfilter/nfnetlink_queue``. :class:`NateditCollector` is a
prometheus_client custom collector: every scrape reads those live objects
and yields metric families, so no value is ever copied into a metric and
left stale. Every outside dependency is an argument (the translator, the
counts, the policy status, the queue reader, the clock), so tests build one
from plain objects and read it through a fresh ``CollectorRegistry``.

Threads. The worker's loop is single-threaded and never locks; the HTTP
server answers in threads of its own. So the collector only ever iterates
*copies* (``list(d.values())``, ``dict(counter)``), each taken in one C-level
call under the GIL, retried should a dict still change size underneath
(:func:`_copy`). A call read while the loop updates it may show fields of
two moments (say, a state one packet old); the next scrape is right.

Cardinality. ``natedit_call_info`` has one series per live call, the
mapping table itself. ``policy.metrics_call_series`` caps it (oldest calls
first, which keeps the series set stable between scrapes);
``natedit_call_info_omitted_calls`` says how many live calls the cap left
out. Every other family is bounded by the protocol (reasons, message
types, directions) or by the servers in use.

Label values known in advance (reasons, message types) are exported at 0
from the start, so ``rate()`` sees the first increase and dashboards show a
flat line rather than nothing.

The same HTTP server answers ``/calls`` with the live table as JSON (the
same source: the call table), which ``natedit calls`` prints.
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from socketserver import ThreadingMixIn
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from . import (
    ACL_REFUSALS,
    CallInfo,
    CallState,
    Datapath,
    Direction,
    DropReason,
    Malformed,
    MalformedAction,
    MessageType,
    NateditError,
    PassReason,
    Policy,
    Refusal,
    ReleaseReason,
    Translator,
    WorkerDown,
)
from .status import PolicyStatus

PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"
"""The kernel's per-queue figures; per network namespace, like everything in /proc/net."""
CALLS_PATH = "/calls"
METRICS_PATH = "/metrics"
FETCH_TIMEOUT = 5.0
"""Seconds ``natedit calls`` waits for the worker."""
CALLS_CHUNK = 16
"""Calls encoded per ``json.dumps`` (one C call, which holds the GIL throughout: the
whole table of 64,000 calls in one held the packet path for 239 ms; 16 take about
0.05 ms). The scrape lets the interpreter go after each (:func:`calls_body`): a
thread letting go that often leaves the waiting loop well under a millisecond,
where the switch interval alone left it several on a busy machine."""
SERIES_CHUNK = 128
"""``natedit_call_info`` series built between two lets-go of the interpreter."""
SWITCH_INTERVAL = 0.001
"""Seconds a thread may hold the interpreter while another waits for it
(``sys.setswitchinterval``; Python's default is 5 ms), set by :class:`MetricsServer`:
a scrape's pure-Python stretches (the exposition's formatting, building rows) give
the packet loop its turn at least this often."""
COPY_RETRIES = 8
"""Attempts at copying a dict the loop is changing before the scrape gives up."""

DIRECTIONS = {d: d.name.lower() for d in Direction}

# Label values known in advance, exported at 0: the core's reason enums (a reason
# not among them is still exported once it happens).
RELEASE_REASONS = tuple(ReleaseReason)
"""Why a mapping ended."""
REFUSAL_REASONS = tuple(Refusal)
"""Why a new call was not mapped (the connection's start, the ACL, a limit, the rate)."""
CONNECTION_REFUSAL_REASONS = ACL_REFUSALS
"""Why a new control connection was not tracked (``Admission.connection_refusal``)."""
MALFORMED_REASONS = tuple(Malformed)
"""ProtocolError reasons: input that does not parse or fails validation."""
DROP_REASONS = tuple(DropReason)
"""Drops that are not malformed input (the refusals included)."""
PASS_REASONS = tuple(PassReason)
"""Deliberate pass-throughs: packets, or Call ID fields, natedit leaves as they came."""
WORKER_ERRORS = ("packet_error", "timer_error", "fastpath_error", "conntrack_error",
                 "ownership_error")
"""The worker's own trouble (``Dispatcher.counts``); a packet_error drops the packet; a
fastpath_error is the kernel fast path repairing itself (its GRE goes through the queue);
a conntrack_error is a failed lookup of a control connection's NAT address (the segment
goes on with the address its connection had); an ownership_error is the ownership sets
being rebuilt (:mod:`natedit.owned`)."""
POLICY_RELOAD_OUTCOMES = ("ok", "failed")

T = TypeVar("T")


class Collector(Protocol):
    """Anything with metric families to add to the worker's (prometheus_client's shape)."""

    def collect(self) -> Iterable[Metric]: ...


class KernelFigures(Protocol):
    """What the kernel datapath (:class:`natedit.fastpath.KernelDatapath`) counts."""

    @property
    def packets(self) -> Sequence[int]:
        """GRE packets its program translated, by :class:`natedit.Direction`."""
        ...

    @property
    def calls(self) -> int:
        """Calls in its maps."""
        ...


# -- the kernel's queue figures -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One line of ``/proc/net/netfilter/nfnetlink_queue`` (net/netfilter/nfnetlink_queue.c,
    ``seq_show``: ``"%5u %6u %5u %1u %5u %5u %5u %8u %2d"``). The counters are u32."""

    queue: int
    portid: int
    """Netlink port ID of the bound process (0: nobody)."""
    queued: int
    """Packets waiting in the queue now (queue_total)."""
    copy_mode: int
    copy_range: int
    dropped: int
    """Packets dropped because the queue was full (queue_dropped)."""
    user_dropped: int
    """Packets dropped because netlink could not deliver them (queue_user_dropped)."""
    id_sequence: int
    """ID of the last packet queued: packets handed to the worker since the bind."""


def parse_queue_stats(text: str) -> dict[int, QueueStats]:
    """The queues in ``text`` by number; lines that do not parse are skipped."""
    out: dict[int, QueueStats] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            values = [int(f) for f in fields[:8]]
        except ValueError:
            continue
        out[values[0]] = QueueStats(*values)
    return out


def read_queue_stats(path: str = PROC_QUEUES) -> dict[int, QueueStats]:
    """The kernel's queue figures of this network namespace ({} without nfnetlink_queue)."""
    try:
        with open(path) as f:
            return parse_queue_stats(f.read())
    except FileNotFoundError:
        return {}


# -- the collector -------------------------------------------------------------------------


class _NoCollection:
    """Cyclic garbage collection off while any scrape runs (then as it was): a scrape
    allocates tens of thousands of objects, and collections in its thread held the
    interpreter for up to 1.3 ms each (a full one, at 65,535 calls about a million
    tracked objects, 170 ms) while the packet loop waited; its rows are freed by
    reference counting as it goes, and the loop's own cyclic garbage waits for the
    scrape's end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.was_enabled = True

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if not self.running:
                self.was_enabled = gc.isenabled()
                gc.disable()
            self.running += 1
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                if not self.running and self.was_enabled:
                    gc.enable()


no_collection = _NoCollection()
"""``with no_collection():`` around one scrape (see :class:`_NoCollection`)."""


def let_go() -> None:
    """Let the interpreter go: a thread waiting for it (the packet loop) runs now,
    without waiting for the switch interval (a scrape calls this between pieces)."""
    time.sleep(0)


def _copy(make: Callable[[], T]) -> T:
    """``make()``, a copy of a container the worker's loop may be changing; retried on
    "changed size during iteration"."""
    for _ in range(COPY_RETRIES - 1):
        try:
            return make()
        except RuntimeError:
            continue
    return make()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("natedit")
    except PackageNotFoundError:
        return "unknown"


def _id(value: int | None) -> str:
    return "" if value is None else str(value)


def build_families(version: str) -> Iterator[Metric]:
    info = InfoMetricFamily("natedit_build", "natedit's version and Python's.")
    info.add_metric([], {"version": version,
                         "python_version": ".".join(map(str, sys.version_info[:3]))})
    yield info


def pool_families(tr: Translator) -> Iterator[Metric]:
    """Public Call IDs in use per pool, and in blocks of 256 (one public high byte): a
    connection whose calls share a client high byte needs them in one block."""
    table, labels = tr.table, ["public_address", "server_address"]
    in_use = GaugeMetricFamily(
        "natedit_call_ids_in_use", "Public Call IDs in use per (public address, server).",
        labels=labels)
    for public, server, n in _copy(table.ids_in_use):
        in_use.add_metric([socket.inet_ntoa(public), socket.inet_ntoa(server)], n)
    yield in_use
    blocks = GaugeMetricFamily(
        "natedit_call_id_blocks_in_use", "Blocks of 256 public Call IDs (one high byte) "
        "holding a live call, per (public address, server).", labels=labels)
    fullest = GaugeMetricFamily(
        "natedit_call_id_fullest_block", "Live calls in the fullest block of 256 public "
        "Call IDs, per (public address, server).", labels=labels)
    for public, server, n, top in _copy(table.blocks_in_use):
        blocks.add_metric([socket.inet_ntoa(public), socket.inet_ntoa(server)], n)
        fullest.add_metric([socket.inet_ntoa(public), socket.inet_ntoa(server)], top)
    yield blocks
    yield fullest


def datapath_families(policy: Policy, figures: KernelFigures | None) -> Iterator[Metric]:
    """The datapath in force and the kernel datapath's figures (0 without it)."""
    mode = GaugeMetricFamily(
        "natedit_datapath", "Where established calls' GRE is translated (policy "
        "datapath): 1 for the datapath in force.", labels=["datapath"])
    for datapath in Datapath:
        mode.add_metric([datapath.value], 1 if policy.datapath is datapath else 0)
    yield mode
    packets = CounterMetricFamily(
        "natedit_kernel_gre_packets", "GRE packets the kernel datapath's tc-BPF program "
        "translated, by direction (natedit_gre_packets_total counts them too).",
        labels=["direction"])
    for direction, label in DIRECTIONS.items():
        packets.add_metric([label], 0 if figures is None else figures.packets[direction])
    yield packets
    yield GaugeMetricFamily(
        "natedit_kernel_calls", "Calls whose GRE the kernel datapath translates (elements "
        "in its maps; 0 with datapath userspace).",
        value=0 if figures is None else figures.calls)


class NateditCollector:
    """Yields natedit's metric families from the live worker at every scrape.

    ``translator`` may be None (a worker running a stand-in core): then only the
    worker, queue, policy and build families are exported. ``current_policy`` defaults
    to ``translator.policy`` (which a reload replaces).
    """

    def __init__(
        self,
        translator: Translator | None,
        dispatcher_counts: Mapping[str, int],
        policy_status: PolicyStatus,
        queue_stats_reader: Callable[[], Mapping[int, QueueStats]] = read_queue_stats,
        *,
        current_policy: Callable[[], Policy] | None = None,
        queue_maxlen: int | None = None,
        version: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        extra: Sequence[Collector] = (),
        kernel: Callable[[], KernelFigures | None] = lambda: None,
    ) -> None:
        if current_policy is None:
            if translator is None:
                raise ValueError("current_policy is needed without a translator")
            core = translator

            def current_policy() -> Policy:
                return core.policy

        self.translator = translator
        self.dispatcher_counts = dispatcher_counts
        self.policy_status = policy_status
        self.queue_stats_reader = queue_stats_reader
        self.current_policy = current_policy
        self.queue_maxlen = queue_maxlen
        self.version = _version() if version is None else version
        self.clock = clock
        self.extra = extra
        """Collectors of the worker's other parts (the event stream), scraped with it."""
        self.kernel = kernel
        """The kernel datapath's figures now (None: ``datapath: userspace``)."""

    def collect(self) -> Iterator[Metric]:
        for part in self.extra:
            yield from part.collect()
        policy = self.current_policy()
        yield from build_families(self.version)
        yield from self._policy(policy)
        yield from self._worker()
        yield from self._queues(policy)
        yield from datapath_families(policy, self.kernel())
        if self.translator is not None:
            yield from self._table(self.translator, policy)
            yield from self._stats(self.translator, policy)

    # -- families ----------------------------------------------------------------------

    def _policy(self, policy: Policy) -> Iterator[Metric]:
        st = self.policy_status
        info = InfoMetricFamily("natedit_policy", "The policy in force: its file.")
        info.add_metric([], {"source": st.source or "builtin"})
        yield info
        yield GaugeMetricFamily(
            "natedit_policy_loaded_timestamp_seconds",
            "When the policy in force was loaded (seconds since the epoch).",
            value=st.loaded_at)
        reloads = CounterMetricFamily(
            "natedit_policy_reloads", "Policy reload attempts by outcome.", labels=["outcome"])
        counts = _copy(lambda: dict(st.reloads))
        for outcome in (*POLICY_RELOAD_OUTCOMES, *sorted(counts.keys() - set(
                POLICY_RELOAD_OUTCOMES))):
            reloads.add_metric([outcome], counts.get(outcome, 0))
        yield reloads
        yield GaugeMetricFamily(
            "natedit_policy_reload_failed",
            "1 when the last reload was rejected (the previous policy stays in force).",
            value=0 if st.last_error is None else 1)
        limits = (
            ("natedit_calls_limit", "Live calls in all (policy max_calls).", policy.max_calls),
            ("natedit_calls_per_client_limit", "Live calls per private address "
             "(policy max_calls_per_client).", policy.max_calls_per_client),
            ("natedit_control_connections_limit", "Tracked control connections "
             "(policy max_control_connections).", policy.max_control_connections),
            ("natedit_call_info_limit", "Most natedit_call_info series exported "
             "(policy metrics_call_series).", policy.metrics_call_series),
        )
        for name, doc, value in limits:
            yield GaugeMetricFamily(name, doc, value=value)
        down = GaugeMetricFamily(
            "natedit_on_worker_down",
            "What the queue rules do with PPTP while no worker is bound "
            "(policy on_worker_down): 1 for the mode in force.", labels=["mode"])
        for mode in WorkerDown:
            down.add_metric([mode.value], 1 if policy.on_worker_down is mode else 0)
        yield down

    def _worker(self) -> Iterator[Metric]:
        counts = _copy(lambda: dict(self.dispatcher_counts))
        errors = CounterMetricFamily(
            "natedit_worker_errors",
            "Exceptions of the worker by kind (packet_error: the packet was dropped).",
            labels=["kind"])
        for kind in (*WORKER_ERRORS, *sorted(counts.keys() - set(WORKER_ERRORS))):
            errors.add_metric([kind], counts.get(kind, 0))
        yield errors

    def _queues(self, policy: Policy) -> Iterator[Metric]:
        try:
            stats = self.queue_stats_reader()
        except OSError:
            stats = {}
        labels = ["queue", "direction"]
        bound = GaugeMetricFamily(
            "natedit_queue_bound", "1 when a process is bound to the NFQUEUE.", labels=labels)
        length = GaugeMetricFamily(
            "natedit_queue_length", "Packets waiting in the NFQUEUE.", labels=labels)
        packets = CounterMetricFamily(
            "natedit_queue_packets",
            "Packets the kernel handed to the NFQUEUE since it was bound (id_sequence).",
            labels=labels)
        dropped = CounterMetricFamily(
            "natedit_queue_dropped",
            "Packets the kernel dropped because the NFQUEUE was full.", labels=labels)
        user_dropped = CounterMetricFamily(
            "natedit_queue_user_dropped",
            "Packets the kernel dropped because netlink could not deliver them "
            "(socket buffer full).", labels=labels)
        queues = ((policy.queue_outbound, Direction.OUTBOUND),
                  (policy.queue_inbound, Direction.INBOUND))
        for number, direction in queues:
            values = [str(number), DIRECTIONS[direction]]
            q = stats.get(number)
            bound.add_metric(values, 1 if q is not None and q.portid != 0 else 0)
            if q is None:
                continue
            length.add_metric(values, q.queued)
            packets.add_metric(values, q.id_sequence)
            dropped.add_metric(values, q.dropped)
            user_dropped.add_metric(values, q.user_dropped)
        yield from (bound, length, packets, dropped, user_dropped)
        if self.queue_maxlen is not None:
            yield GaugeMetricFamily(
                "natedit_queue_length_max",
                "Packets an NFQUEUE holds before the kernel drops (queue_maxlen).",
                value=self.queue_maxlen)

    def _table(self, tr: Translator, policy: Policy) -> Iterator[Metric]:
        table = tr.table
        calls = _copy(lambda: list(table.calls()))
        cap = policy.metrics_call_series
        info = GaugeMetricFamily(
            "natedit_call_info",
            "The mapping table: one series per live call (value 1), oldest first, "
            "at most policy metrics_call_series.",
            labels=["client_address", "client_call_id", "server_address", "server_call_id",
                    "public_address", "public_call_id", "state"])
        by_state = dict.fromkeys(CallState, 0)
        for i, call in enumerate(calls):
            by_state[call.state] += 1
            if not i % SERIES_CHUNK:
                let_go()
        info.samples = _CallSeries(calls[:cap])  # type: ignore[assignment]
        yield info
        yield GaugeMetricFamily(
            "natedit_call_info_omitted_calls",
            "Live calls left out of natedit_call_info by the series cap.",
            value=max(0, len(calls) - cap))
        live = GaugeMetricFamily("natedit_calls", "Live calls by state.", labels=["state"])
        for state, n in by_state.items():
            live.add_metric([state.value], n)
        yield live
        yield GaugeMetricFamily(
            "natedit_control_connections", "Tracked control connections (TCP 1723).",
            value=table.connection_count())
        yield GaugeMetricFamily(
            "natedit_clients", "Private addresses with at least one live call.",
            value=table.client_count())
        yield from pool_families(tr)
        yield GaugeMetricFamily(
            "natedit_call_id_pool_size",
            "Public Call IDs per (public address, server) (policy call_id_first..last).",
            value=policy.call_id_last - policy.call_id_first + 1)

    def _stats(self, tr: Translator, policy: Policy) -> Iterator[Metric]:
        st = tr.stats
        yield CounterMetricFamily(
            "natedit_calls_mapped", "Calls given a public Call ID.", value=st.calls_mapped)
        yield CounterMetricFamily(
            "natedit_calls_high_byte_relaxed",
            "Calls mapped without the one-to-one high-byte rule (no free ID kept it).",
            value=tr.table.relaxed)
        yield CounterMetricFamily(
            "natedit_calls_restored",
            "Calls put back from the previous run's records at start.",
            value=st.calls_restored)
        yield _by_reason("natedit_calls_refused",
                         "Requests for new calls refused, by reason (retransmissions not "
                         "counted).", st.calls_refused, REFUSAL_REASONS)
        yield _by_reason("natedit_connections_refused",
                         "New control connections the ACL denied, by reason.",
                         st.connections_refused, CONNECTION_REFUSAL_REASONS)
        yield _by_reason("natedit_calls_released", "Mappings ended, by reason.",
                         st.calls_released, RELEASE_REASONS)

        messages = CounterMetricFamily(
            "natedit_control_messages", "Complete PPTP control messages by direction and type.",
            labels=["direction", "message_type"])
        seen = _copy(lambda: dict(st.messages))
        for direction in DIRECTIONS.values():
            for message_type in MessageType:
                key = (direction, message_type.name)
                messages.add_metric([direction, message_type.name.lower()], seen.pop(key, 0))
        for (direction, name), n in sorted(seen.items()):
            messages.add_metric([direction, name.lower()], n)
        yield messages

        rewrites = CounterMetricFamily(
            "natedit_call_id_rewrites", "Call ID fields rewritten, by message type and field.",
            labels=["message_type", "field"])
        seen = _copy(lambda: dict(st.rewrites))
        known = set(st.known_rewrites)
        for name, kind in sorted(known | seen.keys()):
            rewrites.add_metric([name.lower(), kind], seen.get((name, kind), 0))
        yield rewrites

        gre_packets = CounterMetricFamily(
            "natedit_gre_packets", "GRE packets translated, by direction.", labels=["direction"])
        gre_bytes = CounterMetricFamily(
            "natedit_gre_bytes", "Bytes of GRE packets translated (IP headers included), "
            "by direction.", labels=["direction"])
        for d, label in DIRECTIONS.items():
            gre_packets.add_metric([label], st.gre_packets[d])
            gre_bytes.add_metric([label], st.gre_bytes[d])
        yield gre_packets
        yield gre_bytes

        verdicts = _copy(lambda: dict(st.verdicts))
        malformed_action = "drop" if policy.malformed is MalformedAction.DROP else "accept"
        drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        passes: dict[str, int] = dict.fromkeys(PASS_REASONS, 0)
        (drops if malformed_action == "drop" else passes).update(
            dict.fromkeys(MALFORMED_REASONS, 0))
        malformed: dict[tuple[str, str], int] = {
            (r, malformed_action): 0 for r in MALFORMED_REASONS}
        for (action, reason), n in verdicts.items():
            (drops if action == "drop" else passes)[reason] = n
            if reason in MALFORMED_REASONS:
                malformed[(reason, action)] = n
        packet_errors = self.dispatcher_counts.get("packet_error", 0)
        drops["packet_error"] = drops.get("packet_error", 0) + packet_errors
        yield _by_reason("natedit_packets_dropped",
                         "Packets natedit dropped, by reason (packet_error: the worker failed).",
                         drops, ())
        yield _by_reason("natedit_packets_passed",
                         "Packets natedit passed untouched on purpose, by reason.", passes, ())
        family = CounterMetricFamily(
            "natedit_malformed_packets",
            "Packets that failed parsing or validation, by reason and what they got.",
            labels=["reason", "action"])
        for (reason, action), n in sorted(malformed.items()):
            family.add_metric([reason, action], n)
        yield family

    # -- /calls ---------------------------------------------------------------------------

    def calls_json(self) -> list[dict[str, Any]]:
        """The live call table (all of it, no cap), as ``/calls`` serves it."""
        return [row for rows in self.calls_chunks() for row in rows]

    def calls_chunks(self) -> Iterator[list[dict[str, Any]]]:
        """The rows of ``/calls``, CALLS_CHUNK calls at a time: the rows of one chunk
        are built, sent and freed before the next (freeing 65,535 rows at once was a
        20 ms stall of the packet path on its own)."""
        tr = self.translator
        if tr is None:
            return
        calls = _copy(lambda: list(tr.table.calls()))  # references only: cheap to drop
        now = self.clock()
        ntoa = socket.inet_ntoa
        for i in range(0, len(calls), CALLS_CHUNK):
            yield [
                {
                    "client_address": ntoa(c.client_ip),
                    "client_call_id": c.client_call_id,
                    "server_address": ntoa(c.server_ip),
                    "server_call_id": c.server_call_id,
                    "public_address": ntoa(c.public_ip),
                    "public_call_id": c.public_call_id,
                    "state": c.state.value,
                    "state_seconds": round(now - c.since, 3),
                    "idle_seconds": round(now - c.last_seen, 3),
                    "gre_packets": {"outbound": c.gre_packets[0],
                                    "inbound": c.gre_packets[1]},
                    "gre_bytes": {"outbound": c.gre_bytes[0], "inbound": c.gre_bytes[1]},
                }
                for c in calls[i:i + CALLS_CHUNK]
            ]


class _CallSeries:
    """``natedit_call_info``'s samples, each built as the exposition reads it and freed
    once written, the interpreter let go every :data:`SERIES_CHUNK`: built as a list,
    the 10,000 samples (about 100,000 objects) were also freed in one go, which held
    the packet loop for about 4 ms at the end of the family."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls
        """The calls (``CallTable.calls()``), at most ``metrics_call_series``."""

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[Sample]:
        ntoa = socket.inet_ntoa
        for i, call in enumerate(self.calls):
            if i and not i % SERIES_CHUNK:
                let_go()
            yield Sample("natedit_call_info", {
                "client_address": ntoa(call.client_ip),
                "client_call_id": _id(call.client_call_id),
                "server_address": ntoa(call.server_ip),
                "server_call_id": _id(call.server_call_id),
                "public_address": ntoa(call.public_ip),
                "public_call_id": str(call.public_call_id),
                "state": call.state.value}, 1, None)


def _by_reason(name: str, doc: str, counts: Mapping[str, int],
               known: Iterable[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["reason"])
    seen = _copy(lambda: dict(counts))
    for reason in sorted(set(known) | seen.keys()):
        family.add_metric([reason], seen.get(reason, 0))
    return family


# -- the HTTP server ---------------------------------------------------------------------


MAX_CLIENTS = 16
"""Most connections served at once (one thread each): a scraper, ``natedit calls``
and a few curious operators need far fewer; the next ones are closed unanswered
(counted) until one ends, so idle connections cannot pile up threads."""
IDLE_TIMEOUT = 5.0
"""Seconds a connection may take to send its request (and to take the answer) before
it is closed: a scraper sends at once; an idle connection is let go."""
BACKLOG = 64
"""Connections the kernel queues before they are accepted (socketserver's default: 5)."""
METHODS = ("GET", "HEAD")


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most :data:`MAX_CLIENTS` at once, each with a
    socket timeout: bounded whatever clients do."""

    daemon_threads = True
    request_queue_size = BACKLOG
    max_clients = MAX_CLIENTS
    idle_timeout = IDLE_TIMEOUT

    def server_activate(self) -> None:
        self.slots = threading.BoundedSemaphore(self.max_clients)
        self.turned_away = 0
        """Connections closed unanswered because every slot was busy."""
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.turned_away += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to tell on stderr


class _QuietHandler(WSGIRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(self.server.idle_timeout)
        super().setup()

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        # http.server folds a leading '//' into '/': keep what the client asked for
        env["natedit.target"] = self.requestline.split(" ")[1] if " " in self.requestline \
            else ""
        return env

    def log_message(self, format: str, *args: Any) -> None:
        pass


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def registry_for(collector: NateditCollector, *, process: bool = True) -> CollectorRegistry:
    """A registry with natedit's collector and, unless told not, process and platform
    metrics (``process_*``, ``python_info``)."""
    registry = CollectorRegistry()
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


def calls_body(chunks: Iterable[list[dict[str, Any]]]) -> Iterator[bytes]:
    """``{"calls": [...]}``, one piece per chunk of rows, each sent before the next is
    encoded: the packet path gets the interpreter back between two pieces
    (:func:`let_go`)."""
    yield b'{"calls": ['
    first = True
    for rows in chunks:
        if rows:
            piece = json.dumps(rows)[1:-1]
            yield (piece if first else ", " + piece).encode()
            first = False
        let_go()
    yield b"]}"


def _calls_scrape(calls: Callable[[], Iterable[list[dict[str, Any]]]]) -> Iterator[bytes]:
    with no_collection():  # (ended by close() too, should the client go away)
        yield from calls_body(calls())


def make_app(registry: CollectorRegistry,
             calls: Callable[[], Iterable[list[dict[str, Any]]]]
             ) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: ``/metrics`` (Prometheus text format), ``/calls`` (JSON)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if environ.get("REQUEST_METHOD", "GET") not in METHODS:
            body = b"only GET and HEAD\n"
            start_response("405 Method Not Allowed", [
                ("Allow", ", ".join(METHODS)), ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("natedit.target", path).split("?")[0] != path:
            path = ""  # '//calls' and the like: not one of the paths served
        if path == CALLS_PATH:
            start_response("200 OK", [("Content-Type", "application/json")])
            return _calls_scrape(calls)  # the connection's end ends the body
        if path in (METRICS_PATH, "/"):
            with no_collection():
                result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        body = b"not found: try /metrics or /calls\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return app


class MetricsServer:
    """The HTTP endpoint in a daemon thread. Use as a context manager, or start()/stop()."""

    def __init__(self, listen: str, collector: NateditCollector, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.listen = listen
        self.collector = collector
        self.registry = registry if registry is not None else registry_for(collector)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The address actually bound (port 0 in ``listen`` picks a free one)."""
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsServer:
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)  # (process-wide: see SWITCH_INTERVAL)
        host, port = parse_listen(self.listen)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)[0][0]
            server_class = type("_Server", (_Server,), {"address_family": family})
            app = make_app(self.registry, self.collector.calls_chunks)
            httpd: _Server = make_server(host, port, app, server_class=server_class,
                                         handler_class=_QuietHandler)
        except OSError as exc:
            raise NateditError(
                f"cannot serve metrics on {self.listen} ({exc.strerror or exc}): "
                "is another natedit running? (policy metrics_listen)") from exc
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="natedit-metrics",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- natedit calls ----------------------------------------------------------------------------


def calls_url(base: str) -> str:
    """``/calls`` of a worker given as ``host:port`` or a URL (any path is replaced)."""
    if "://" not in base:
        base = f"http://{base}"
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, CALLS_PATH, "", ""))


def fetch_calls_json(base: str, timeout: float = FETCH_TIMEOUT) -> list[dict[str, Any]]:
    """The running worker's call table as ``/calls`` has it; NateditError when no worker
    answers."""
    url = calls_url(base)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.load(response)
        calls: list[dict[str, Any]] = data["calls"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise NateditError(f"no natedit worker answers at {url} ({why})") from exc
    return calls


def call_info(c: Mapping[str, Any]) -> CallInfo:
    """One call of ``/calls`` as a :class:`CallInfo`."""
    return CallInfo(IPv4Address(c["client_address"]), c["client_call_id"],
                    IPv4Address(c["server_address"]), c["server_call_id"],
                    IPv4Address(c["public_address"]), c["public_call_id"], c["state"])


def fetch_calls(base: str, timeout: float = FETCH_TIMEOUT) -> list[CallInfo]:
    """The running worker's call table; NateditError when no worker answers."""
    return [call_info(c) for c in fetch_calls_json(base, timeout)]


@contextlib.contextmanager
def serving(listen: str, collector: NateditCollector) -> Iterator[MetricsServer]:
    """The endpoint for the duration of a ``with`` block."""
    with MetricsServer(listen, collector) as server:
        yield server


def worker_collector(translator: object, dispatcher_counts: Mapping[str, int],
                     policy_status: PolicyStatus, policy: Policy, *,
                     queue_maxlen: int | None = None,
                     extra: Sequence[Collector] = (),
                     kernel: Callable[[], KernelFigures | None] = lambda: None
                     ) -> NateditCollector:
    """The worker's collector: the call table families only with the real core."""
    if isinstance(translator, Translator):
        return NateditCollector(translator, dispatcher_counts, policy_status,
                                queue_maxlen=queue_maxlen, extra=extra, kernel=kernel)
    return NateditCollector(None, dispatcher_counts, policy_status,
                            current_policy=lambda: policy, queue_maxlen=queue_maxlen,
                            extra=extra, kernel=kernel)
