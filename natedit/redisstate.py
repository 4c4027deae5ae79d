"""The call table in Redis: the state backend of a gateway pair (``state: redis://...``).

Theory of operation
-------------------
:mod:`natedit.state` keeps the table in a local SQLite file; this backend keeps
the same records in Redis, so that a second gateway can follow them through
Redis replication (``REPLICAOF``) and take them over (:mod:`natedit.pair`). Each
gateway talks to its *local* Redis only: the active's is the master, the
standby's a replica of it, promoted on failover.

Keys (all under :data:`PREFIX`):

* ``calls``: a hash, one field per live call, ``"public|server|public Call ID"``
  -> the record as a JSON list (the columns of :mod:`natedit.state`);
* ``feed``: a stream, the change feed: one entry per change, fields ``seq``
  (1, 2, 3, ... without gaps), ``op`` (``set``, ``del``, or ``reset``: the whole
  hash was rewritten), ``key`` and ``rec``;
* ``seq``: the last ``seq`` written; ``alive_at``: as in the SQLite file.

Writing. The worker's :class:`natedit.state.Journal` is the same as for SQLite:
once per turn of the loop, the calls this turn's events named go to
:meth:`RedisStore.write`, which sends them in **one pipeline** in a MULTI/EXEC
transaction (hash, feed and ``seq`` change together: a reader sees all of a
turn or none of it). A stream, not pub/sub, is the change feed because a
stream entry is stored and replicated like any other write, carries its
position, and can be read again: a follower bulk-loads ``calls`` and the
feed's last ID in one transaction and reads the feed from that ID on, so
nothing falls between the load and the feed, and a follower that was away
(or finds a gap in ``seq``, or a ``reset``) loads again. Pub/sub loses what is
published while a reader is away and has no position to join a bulk load to.
The feed is trimmed to about :data:`FEED_LENGTH` entries.

Failure. Redis errors never stop the worker: a failed write raises
:class:`RedisUnavailable` (an OSError: the journal counts ``state_error``,
logs and keeps the changes for the next turn); after a failure the store does
not try again for :data:`RETRY_AFTER` seconds, and every command has a short
timeout (:data:`TIMEOUT`), so an unreachable Redis costs the packet loop at
most one timeout per :data:`RETRY_AFTER`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import redis

from . import CallRecord
from .state import Journal, Key, Loaded, RestoringTranslator, _restore, record_row, row_record

log = logging.getLogger("natedit")

PREFIX = "natedit:"
CALLS, FEED, SEQ, ALIVE = (PREFIX + k for k in ("calls", "feed", "seq", "alive_at"))
FEED_LENGTH = 100_000
"""Entries the change feed keeps (approximately): a follower further behind loads again."""
TIMEOUT = 0.5
"""Seconds any one Redis command may take (connect included)."""
RETRY_AFTER = 1.0
"""Seconds without trying Redis again after a failure."""


class RedisUnavailable(OSError):
    """Redis could not be reached or refused a command."""


def is_redis_url(path: str | None) -> bool:
    return bool(path) and str(path).startswith(("redis://", "rediss://", "unix://"))


def connect(url: str, timeout: float = TIMEOUT) -> redis.Redis:
    """A client for ``url`` (redis://HOST:PORT/DB or unix:///PATH?db=N); connects lazily."""
    try:
        return redis.Redis.from_url(url, socket_timeout=timeout,
                                    socket_connect_timeout=timeout, decode_responses=True)
    except ValueError as exc:
        raise RedisUnavailable(f"not a Redis URL: {url} ({exc})") from exc


def key_text(key: Key) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


def record_key(rec: CallRecord) -> Key:
    return (str(rec.public_address), str(rec.server_address), rec.public_call_id)


def encode(rec: CallRecord) -> str:
    return json.dumps(record_row(rec), separators=(",", ":"))


def decode(text: str) -> CallRecord | None:
    """The record ``text`` holds, or None when it holds no valid one."""
    try:
        row = json.loads(text)
    except ValueError:
        return None
    return row_record(tuple(row)) if isinstance(row, list) else None


@dataclass
class Snapshot:
    """The table as one transaction read it: records by key text, and the feed's place."""

    records: dict[str, CallRecord] = field(default_factory=dict)
    seq: int = 0
    feed_id: str = "0-0"
    alive_at: float | None = None
    invalid: int = 0


def read_snapshot(client: redis.Redis) -> Snapshot:
    """Bulk load: the hash, ``seq``, ``alive_at`` and the feed's last ID in one MULTI/EXEC."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(CALLS)
    pipe.get(SEQ)
    pipe.get(ALIVE)
    pipe.xrevrange(FEED, count=1)
    rows, seq, alive, last = pipe.execute()
    snap = Snapshot(seq=int(seq or 0), feed_id=last[0][0] if last else "0-0")
    if alive is not None:
        try:
            snap.alive_at = float(alive)
        except ValueError:
            snap.alive_at = None
    for k, v in rows.items():
        rec = decode(v)
        if rec is None:
            snap.invalid += 1
        else:
            snap.records[k] = rec
    return snap


class RedisStore:
    """The Redis side of :class:`natedit.state.Journal` (its ``store``)."""

    def __init__(self, url: str, client: redis.Redis, seq: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = url
        """What the journal's log lines name."""
        self.client = client
        self.seq = seq
        """The last feed ``seq`` this store wrote (or found)."""
        self.clock = clock
        self._failed_at: float | None = None
        self.resync: Callable[[], list[CallRecord]] | None = None
        """The whole table, for a write that must rewrite it (see :attr:`synced`)."""
        self.synced = False
        """Whether Redis holds what this store wrote (False until a ``replace_all`` went
        through, and after any failure: a write then rewrites the whole table from
        :attr:`resync`, a ``reset`` in the feed)."""

    @classmethod
    def open(cls, url: str, *, wall: Callable[[], float] = time.time) -> tuple[RedisStore, Loaded]:
        """Connect to ``url`` and read the table it holds. Raises RedisUnavailable."""
        client = connect(url)
        try:
            snap = read_snapshot(client)
        except redis.RedisError as exc:
            client.close()
            raise RedisUnavailable(f"cannot read the call table from {url}: {exc}") from exc
        loaded = Loaded(records=list(snap.records.values()), invalid_rows=snap.invalid,
                        created=snap.seq == 0 and not snap.records)
        if snap.alive_at is not None:
            loaded.downtime = max(0.0, wall() - snap.alive_at)
        return cls(url, client, snap.seq), loaded

    def _pipeline(self) -> Any:
        now = self.clock()
        if self._failed_at is not None and now - self._failed_at < RETRY_AFTER:
            raise RedisUnavailable(f"{self.path}: not retried yet (failed "
                                   f"{now - self._failed_at:.1f} s ago)")
        return self.client.pipeline(transaction=True)

    def _execute(self, pipe: Any) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._failed_at = self.clock()
            self.synced = False  # Redis may have lost what it had: rewrite it all next time
            raise RedisUnavailable(f"{self.path}: {exc}") from exc
        self._failed_at = None

    def _feed(self, pipe: Any, op: str, key: str, rec: str = "") -> None:
        self.seq += 1
        pipe.xadd(FEED, {"seq": self.seq, "op": op, "key": key, "rec": rec},
                  maxlen=FEED_LENGTH, approximate=True)

    def write(self, upserts: Iterable[CallRecord], deletes: Iterable[Key],
              alive_at: float | None) -> None:
        """One pipeline, one transaction: these calls written, those removed, fed."""
        if not self.synced and self.resync is not None:
            self.replace_all(self.resync(), alive_at if alive_at is not None else time.time())
            return
        pipe = self._pipeline()
        seq = self.seq
        for rec in upserts:
            key, text = key_text(record_key(rec)), encode(rec)
            pipe.hset(CALLS, key, text)
            self._feed(pipe, "set", key, text)
        for k in deletes:
            key = key_text(k)
            pipe.hdel(CALLS, key)
            self._feed(pipe, "del", key)
        pipe.set(SEQ, self.seq)
        if alive_at is not None:
            pipe.set(ALIVE, repr(alive_at))
        try:
            self._execute(pipe)
        except RedisUnavailable:
            self.seq = seq  # nothing of it was written: the same changes are retried
            raise

    def replace_all(self, records: Iterable[CallRecord], alive_at: float) -> None:
        """Make the hash hold exactly ``records``; the feed says ``reset`` (followers load)."""
        pipe = self._pipeline()
        seq = self.seq
        if not self.synced:  # continue the feed's seq where Redis has it
            try:
                self.seq = seq = max(seq, int(self.client.get(SEQ) or 0))
            except (redis.RedisError, ValueError) as exc:
                self._failed_at = self.clock()
                raise RedisUnavailable(f"{self.path}: {exc}") from exc
        pipe.delete(CALLS)
        mapping = {key_text(record_key(r)): encode(r) for r in records}
        if mapping:
            pipe.hset(CALLS, mapping=mapping)
        self._feed(pipe, "reset", "")
        pipe.set(SEQ, self.seq)
        pipe.set(ALIVE, repr(alive_at))
        try:
            self._execute(pipe)
        except RedisUnavailable:
            self.seq = seq
            raise
        self.synced = True

    def rows(self) -> int:
        return int(self.client.hlen(CALLS))

    def records(self) -> list[CallRecord]:
        return list(read_snapshot(self.client).records.values())

    def close(self) -> None:
        self.client.close()


def restore_into(translator: RestoringTranslator, url: str, counts: MutableMapping[str, int],
                 followed: list[CallRecord] | None = None) -> Journal:
    """Put the calls back into ``translator`` (those of ``followed``, else those Redis
    holds), make Redis hold exactly the restored table, and return the journal.

    Redis unreachable: the worker starts with ``followed`` (or empty); the journal
    keeps trying (``state_error`` counted) and its first write that goes through
    rewrites the whole table (a ``reset``)."""
    loaded = Loaded(records=list(followed or ()))
    try:
        store, read = RedisStore.open(url)
        if followed is None:
            loaded = read
    except RedisUnavailable as exc:
        counts["state_error"] = counts.get("state_error", 0) + 1
        log.error("state_error: %s; starting with %d calls, writes retried", exc,
                  len(loaded.records))
        store = RedisStore(url, connect(url), 0)
    store.resync = translator.snapshot
    _restore(translator, url, loaded, time.monotonic)
    try:
        store.replace_all(translator.snapshot(), time.time())
    except RedisUnavailable as exc:
        counts["state_error"] = counts.get("state_error", 0) + 1
        log.error("state_error: %s", exc)
    return Journal(store, translator.call_record, counts)


def read_seq(client: redis.Redis) -> int:
    """The feed's last ``seq`` Redis holds (0: none, or unreadable)."""
    try:
        return int(client.get(SEQ) or 0)
    except (redis.RedisError, ValueError):
        return 0
