"""A gateway pair: follow the active's call table, take it over when promoted.

Theory of operation
-------------------
Two gateways share one virtual public address (keepalived, ``deploy/keepalived/``).
Each runs natedit with ``--state redis://...`` naming its *local* Redis; the
standby's Redis is a replica of the active's (``REPLICAOF``), so the active's
journal (:mod:`natedit.redisstate`: the ``calls`` hash and the ``feed`` stream)
reaches the standby through Redis' own replication.

Roles (:class:`Role`): a worker started with ``--follow`` is *following*: it
binds no queue and translates nothing; its rules are installed (PPTP queued to
nobody is dropped: fail-closed, as in a restart), and a :class:`Follower`
thread keeps a warm copy of the table from the local replica (bulk load, then
the feed; a gap in the feed's ``seq``, a ``reset`` or a trimmed feed loads
again). It is *standby* while it cannot follow (its Redis unreachable, or the
replica's link to its master down). ``natedit promote`` (:data:`PROMOTE_SIGNAL`
to the PID in ``--pid-file``, like ``natedit reload``'s SIGHUP) makes it read the
feed to its end one last time, then run :func:`natedit.worker.run` with the
followed table restored (the same public Call IDs: GRE flows at once; control
connections resynchronise at the next message header, as after a restart):
*active*. ``natedit demote`` (:data:`DEMOTE_SIGNAL`) stops the active worker,
leaving its rules (PPTP dropped), and goes back to following.

Split brain. Each node allocates public Call IDs from its own share of the range
(``pair.node`` of ``pair.nodes``: IDs with ``id % nodes == node - 1``), so two
actives never give one public Call ID to two live calls. A promotion is
refused when the followed table holds a call that conflicts with one this node
had when it was last active (one public Call ID, two calls; or one client call,
two public Call IDs): the shares are then misconfigured.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import selectors
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from . import CallRecord, NateditError, redisstate
from .logs import Throttle, call_id

log = logging.getLogger("natedit")

PROMOTE_SIGNAL = signal.SIGRTMIN + 1
"""``natedit promote``: a following worker takes the table and starts translating."""
DEMOTE_SIGNAL = signal.SIGRTMIN + 2
"""``natedit demote``: an active worker stops translating and follows again."""
PROMOTE, DEMOTE = "SIGRTMIN+1", "SIGRTMIN+2"
"""Their names (what :func:`signal_name` says)."""


def signal_name(signum: int) -> str:
    """SIGTERM, SIGHUP, ...; the real-time signals as SIGRTMIN+n."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
BLOCK = 0.2
"""Seconds one read of the feed waits for entries (a promotion waits at most this)."""
CHECK_INTERVAL = 1.0
"""Seconds between two looks at the replica's link and head."""
RETRY = 0.5
"""Seconds before trying Redis again after an error."""


class Role(enum.Enum):
    ACTIVE = "active"
    """Translating, writing the table to its Redis."""
    FOLLOWING = "following"
    """Keeping a warm copy of the active's table; translating nothing."""
    STANDBY = "standby"
    """In follow mode but not following (its Redis unreachable, or the replica's link down)."""


class Follower:
    """The warm copy of the table the local Redis holds, kept by a thread of its own."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.clock = clock
        self.client = redisstate.connect(url, timeout=BLOCK + 1.0)
        self.records: dict[str, CallRecord] = {}
        self.seq = 0
        """The feed ``seq`` the copy is at."""
        self.head = 0
        """The feed ``seq`` the local Redis is at (last look)."""
        self.feed_id = "0-0"
        self.applied = 0
        """Feed entries applied."""
        self.loads = 0
        """Bulk loads (the first, and after each gap or reset)."""
        self.errors = 0
        self.up = False
        """The last read from the local Redis worked."""
        self.link_up: bool | None = None
        """The replica's link to its master (None: this Redis is a master)."""
        self.last_event: float | None = None
        self.started = clock()
        self._need_load = True
        self._checked = -1e9
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._throttle = Throttle(5.0, clock)

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> Follower:
        self._thread = threading.Thread(target=self._run, name="natedit-follow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BLOCK + 2.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step(BLOCK)
            except (redis.RedisError, OSError) as exc:
                self._failed(exc)
                self._stop.wait(RETRY)

    def _failed(self, exc: BaseException) -> None:
        self.up = False
        self.errors += 1
        self._need_load = True
        suppressed = self._throttle.allow("follow")
        if suppressed is not None:
            log.error("follow_error: cannot follow the call table in %s: %s", self.url, exc)

    # -- one round ------------------------------------------------------------------------

    def step(self, block: float | None) -> int:
        """Load if needed, then apply what the feed has (waiting up to ``block`` seconds
        for it; None: not at all). Returns the entries applied."""
        if self._need_load:
            self.load()
        now = self.clock()
        if now - self._checked >= CHECK_INTERVAL:
            self._check()
            self._checked = now
        kwargs: dict[str, Any] = {"count": 10_000}
        if block is not None:
            kwargs["block"] = max(1, int(block * 1000))
        answer = self.client.xread({redisstate.FEED: self.feed_id}, **kwargs)
        self.up = True
        entries = _entries(answer)
        applied = 0
        with self._lock:
            for entry_id, fields in entries:
                if not self._apply(entry_id, fields):
                    self._need_load = True
                    break
                applied += 1
        if applied:
            self.applied += applied
            self.last_event = self.clock()
        if self._need_load:
            self.load()
        return applied

    def _apply(self, entry_id: str, fields: dict[str, str]) -> bool:
        """One feed entry into the copy; False when the copy must be loaded again."""
        try:
            seq = int(fields.get("seq", ""))
        except ValueError:
            return False
        op = fields.get("op")
        if seq <= self.seq and op != "reset":
            self.feed_id = entry_id  # in the loaded copy already
            return True
        if op == "reset" or seq != self.seq + 1:
            return False
        key = fields.get("key", "")
        if op == "set":
            rec = redisstate.decode(fields.get("rec", ""))
            if rec is None:
                return False
            self.records[key] = rec
        elif op == "del":
            self.records.pop(key, None)
        else:
            return False
        self.seq, self.feed_id = seq, entry_id
        return True

    def load(self) -> None:
        """Bulk load: the hash and the feed's place, in one transaction."""
        snap = redisstate.read_snapshot(self.client)
        with self._lock:
            self.records = snap.records
            self.seq = self.head = snap.seq
            self.feed_id = snap.feed_id
        self.loads += 1
        self.up = True
        self._need_load = False
        self.last_event = self.clock()

    def _check(self) -> None:
        info = self.client.info("replication")
        link = None if info.get("role") == "master" else info.get("master_link_status") == "up"
        if link != self.link_up:
            log.info("event=replica_link state=%s redis=%s",
                     {None: "master", True: "up", False: "down"}[link], self.url)
        self.link_up = link
        self.head = redisstate.read_seq(self.client)

    def catch_up(self) -> None:
        """After :meth:`stop`: read the feed to its end (the promotion's last read)."""
        self.step(None)
        while self.step(None):
            pass

    # -- what it holds ----------------------------------------------------------------------

    def table(self) -> list[CallRecord]:
        with self._lock:
            return list(self.records.values())

    @property
    def following(self) -> bool:
        return self.up and self.link_up is not False

    @property
    def behind(self) -> int:
        return max(0, self.head - self.seq)

    def seconds_since_event(self) -> float:
        return self.clock() - (self.last_event if self.last_event is not None else self.started)

    def close(self) -> None:
        self.stop()
        self.client.close()


def _entries(answer: Any) -> list[tuple[str, dict[str, str]]]:
    """XREAD's answer (RESP2 list or RESP3 dict) as (id, fields) pairs."""
    if not answer:
        return []
    if isinstance(answer, dict):
        streams: Iterable[Any] = answer.values()
        return [(i, f) for entries in streams for i, f in (entries[0] if entries and
                isinstance(entries[0], list) else entries)]
    return [(i, f) for _, entries in answer for i, f in entries]


# -- conflicts (split brain) --------------------------------------------------------------------


def conflicts(followed: Iterable[CallRecord], own: Iterable[CallRecord]) -> list[str]:
    """Why the followed table cannot be taken over on top of ``own`` calls: one line per
    conflict (empty: none). A conflict is one public Call ID (per public address and
    server) held by two different calls, or one client call mapped to two public IDs."""
    by_public: dict[tuple[str, str, int], CallRecord] = {}
    by_client: dict[tuple[str, int, str, int, int | None], CallRecord] = {}
    for rec in own:
        by_public[redisstate.record_key(rec)] = rec
        if rec.client_call_id is not None:
            by_client[_client_key(rec)] = rec
    out = []
    for rec in followed:
        mine = by_public.get(redisstate.record_key(rec))
        if mine is not None and _client_key(mine) != _client_key(rec):
            out.append(f"public Call ID {call_id(rec.public_call_id)} to {rec.server_address}: "
                       f"followed for {rec.client_address}, here for {mine.client_address}")
            continue
        mine = by_client.get(_client_key(rec)) if rec.client_call_id is not None else None
        if mine is not None and mine.public_call_id != rec.public_call_id:
            out.append(f"client {rec.client_address} Call ID {call_id(rec.client_call_id or 0)}:"
                       f" followed as {call_id(rec.public_call_id)}, here as "
                       f"{call_id(mine.public_call_id)}")
    return out


def _client_key(rec: CallRecord) -> tuple[str, int, str, int, int | None]:
    return (str(rec.client_address), rec.client_port, str(rec.server_address), rec.server_port,
            rec.client_call_id)


def in_share(call_id_value: int, node: int, nodes: int) -> bool:
    """Whether a public Call ID belongs to ``node`` of ``nodes`` (1-based)."""
    return nodes <= 1 or call_id_value % nodes == node - 1


# -- the session: one process, its roles over time ------------------------------------------------


@dataclass
class Session:
    """What one ``natedit run`` in a pair keeps across its roles; also its metrics."""

    url: str
    role: Role = Role.ACTIVE
    follower: Follower | None = None
    followed: list[CallRecord] | None = None
    """The table the last promotion took over (the worker restores it)."""
    own: list[CallRecord] = field(default_factory=list)
    """The calls this node held when it was last active (for the conflict check)."""
    counts: Counter[str] = field(default_factory=Counter)
    stopped_by: str | None = None
    """The signal that stopped the last active phase (set by the worker)."""
    snapshot: Callable[[], list[CallRecord]] | None = None
    """While active: the worker's table (set by the worker)."""

    @property
    def current_role(self) -> Role:
        f = self.follower
        if self.role is Role.FOLLOWING and f is not None and not f.following:
            return Role.STANDBY
        return self.role

    def collect(self) -> Iterator[Metric]:
        role = GaugeMetricFamily("natedit_pair_role", "1 for this worker's role in the pair "
                                 "(active, following, standby: cannot follow).", labels=["role"])
        current = self.current_role
        for r in Role:
            role.add_metric([r.value], 1.0 if r is current else 0.0)
        yield role
        f = self.follower if self.role is not Role.ACTIVE else None
        following = GaugeMetricFamily(
            "natedit_pair_following", "1 while following the active's table from the local "
            "Redis replica (0: cannot; active: absent).")
        behind = GaugeMetricFamily(
            "natedit_pair_events_behind", "Feed entries the local Redis has that the followed "
            "copy has not applied yet.")
        since = GaugeMetricFamily(
            "natedit_pair_seconds_since_event", "Seconds since the followed copy last changed "
            "(a feed entry or a load).")
        calls = GaugeMetricFamily("natedit_pair_calls_followed", "Calls in the followed copy.")
        link = GaugeMetricFamily("natedit_pair_replica_link_up",
                                 "1 while the local Redis replica's link to its master is up.")
        if f is not None:
            following.add_metric([], 1.0 if f.following else 0.0)
            behind.add_metric([], float(f.behind))
            since.add_metric([], f.seconds_since_event())
            calls.add_metric([], float(len(f.records)))
            link.add_metric([], 1.0 if f.link_up else 0.0)
        yield from (following, behind, since, calls, link)
        errors = CounterMetricFamily("natedit_pair_follow_errors",
                                     "Failed reads of the followed table from the local Redis.")
        errors.add_metric([], float(f.errors if f is not None else self.counts["follow_error"]))
        yield errors
        changes = CounterMetricFamily("natedit_pair_role_changes",
                                      "Promotions and demotions by outcome.", labels=["change"])
        for change in ("promoted", "promotion_refused", "demoted"):
            changes.add_metric([change], float(self.counts[change]))
        yield changes


# -- the process ------------------------------------------------------------------------------


def run(policy: Any, *, follow: bool, state_path: str, ready_file: str | None = None,
        pid_file: str | None = None, **worker_kwargs: Any) -> int:
    """``natedit run`` in a pair: follow (``follow``) or run active, then as told by
    ``natedit promote`` and ``natedit demote``, until SIGTERM or SIGINT."""
    from . import worker

    if not redisstate.is_redis_url(state_path):
        raise NateditError(f"--follow needs --state redis://HOST:PORT/DB (found {state_path!r})")
    if policy.public_address is None:
        raise NateditError("a gateway pair needs public_address in the policy (the virtual "
                           "address both gateways share)")
    for signum in (PROMOTE_SIGNAL, DEMOTE_SIGNAL):  # never the default (terminate) between roles
        signal.signal(signum, signal.SIG_IGN)
    session = Session(state_path, role=Role.FOLLOWING if follow else Role.ACTIVE)
    while True:
        if session.role is Role.FOLLOWING:
            records = follow_until_promoted(policy, session, worker_kwargs.get("flavour"),
                                            ready_file, pid_file)
            if records is None:
                return 0
            session.followed = records
            session.role = Role.ACTIVE
        code = worker.run(policy, state_path=state_path, ready_file=ready_file,
                          pid_file=pid_file, pair=session, **worker_kwargs)
        if session.stopped_by != DEMOTE:
            return code
        session.own = session.snapshot() if session.snapshot is not None else []
        session.snapshot = None
        session.followed = None
        session.role = Role.FOLLOWING
        session.counts["demoted"] += 1
        log.info("event=demoted calls=%d: following %s again", len(session.own), state_path)


def follow_until_promoted(policy: Any, session: Session, flavour: Any, ready_file: str | None,
                          pid_file: str | None) -> list[CallRecord] | None:
    """The following phase: the table to take over once promoted, or None (stopped)."""
    from . import metrics, reload, rules, worker
    from .status import PolicyStatus

    ruleset = rules.build_ruleset(policy)
    installation = rules.install(ruleset, flavour or rules.Flavour.IPTABLES)  # fail-closed
    follower = Follower(session.url)
    session.follower = follower
    collector = metrics.NateditCollector(None, session.counts, PolicyStatus(loaded_at=time.time()),
                                         current_policy=lambda: policy, extra=(session,))
    promoted: list[CallRecord] | None = None
    keep_rules = False
    try:
        with worker._signals(ignore=frozenset({DEMOTE_SIGNAL})) as wakeup, \
                metrics.serving(policy.metrics_listen, collector):
            follower.start()
            reload.name_process()
            if pid_file is not None:
                with contextlib.suppress(OSError):
                    reload.write_pid_file(pid_file)
            _ready(ready_file, session, "following")
            log.info("event=following state=%s", session.url)
            while True:
                with selectors.DefaultSelector() as sel:
                    sel.register(wakeup.fd, selectors.EVENT_READ)
                    sel.select(CHECK_INTERVAL)
                wakeup.drain()
                wakeup.hangup = False
                if wakeup.stop == PROMOTE:
                    wakeup.stop = None
                    promoted = _promote(session, follower)
                    if promoted is not None:
                        keep_rules = True
                        break
                    _ready(ready_file, session, "following")
                elif wakeup.stop is not None:
                    keep_rules = wakeup.stop == worker.RESTART_SIGNAL.name
                    log.info("%s received, stopping", wakeup.stop)
                    break
    finally:
        follower.close()
        session.follower = None
        if not keep_rules:
            rules.remove(installation)
        if promoted is None and pid_file is not None:
            reload.remove_pid_file(pid_file)
        if promoted is None and ready_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(ready_file)
    return promoted


def _promote(session: Session, follower: Follower) -> list[CallRecord] | None:
    """Read the feed to its end and check the table; None when the promotion is refused."""
    started = time.monotonic()
    follower.stop()
    try:
        follower.catch_up()
    except (redis.RedisError, OSError) as exc:
        log.warning("promote: the last read of the followed table failed (%s); taking the "
                    "copy as it is (%d calls, seq %d)", exc, len(follower.records), follower.seq)
    table = follower.table()
    problems = conflicts(table, session.own)
    if problems:
        session.counts["promotion_refused"] += 1
        for p in problems:
            log.error("promotion_refused: %s", p)
        log.error("promotion_refused: the followed table conflicts with this node's own calls "
                  "(%d conflicts: are pair.node and pair.nodes different on the two nodes?); "
                  "still following", len(problems))
        follower.start()
        return None
    session.counts["promoted"] += 1
    log.info("event=promoted calls=%d seq=%d took_ms=%.0f", len(table), follower.seq,
             (time.monotonic() - started) * 1000)
    return table


def _ready(ready_file: str | None, session: Session, role: str) -> None:
    """The ready file of the following phase (``natedit promote`` reads it)."""
    if ready_file is None:
        return
    content = {"pid": os.getpid(), "role": role,
               "promotions_refused": session.counts["promotion_refused"]}
    tmp = Path(f"{ready_file}.tmp")
    tmp.write_text(json.dumps(content) + "\n")
    tmp.replace(ready_file)


# -- natedit promote / demote -------------------------------------------------------------------


def ask(pid_file: str, ready_file: str | None, *, promote: bool, wait: float,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Signal the worker of ``pid_file`` (or ``ready_file``) and, with a ready file, wait
    until it reports the role asked for; 0 done, 1 refused. NateditError: no worker or
    no answer in time."""
    from . import reload

    want = "active" if promote else "following"
    signum = PROMOTE_SIGNAL if promote else DEMOTE_SIGNAL
    before = _read_ready(ready_file) if ready_file is not None else None
    pid = int(before["pid"]) if before is not None else reload.read_pid(pid_file)
    if before is not None and before.get("role") == want:
        print(f"natedit: natedit (pid {pid}) is {want} already")
        return 0
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise NateditError(f"no natedit worker with pid {pid}") from None
    if ready_file is None:
        print(f"natedit: asked natedit (pid {pid}) to {'promote' if promote else 'demote'}")
        return 0
    deadline = time.monotonic() + wait
    refused = (before or {}).get("promotions_refused", 0)
    while time.monotonic() < deadline:
        with contextlib.suppress(NateditError):
            now = _read_ready(ready_file)
            if now.get("role") == want:
                print(f"natedit: natedit (pid {pid}) is {want}")
                return 0
            if promote and now.get("promotions_refused", 0) != refused:
                print(f"natedit: natedit (pid {pid}) refused the promotion (conflicting "
                      "calls: its log says which); still following")
                return 1
        sleep(0.02)
    raise NateditError(f"natedit (pid {pid}) did not report being {want} within {wait:g} s")


def _read_ready(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise NateditError(f"cannot read {path} ({exc}): is natedit running?") from exc
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
        raise NateditError(f"{path} holds no pid")
    return data

