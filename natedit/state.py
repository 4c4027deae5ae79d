"""The call table on disk, so that live calls survive a worker crash or restart.

Theory of operation
-------------------
The core keeps no files (:mod:`natedit.core.translator`): it hands out
:class:`~natedit.CallRecord` values and takes them back with
``Translator.restore``. This adapter keeps them in SQLite (stdlib
``sqlite3``) in WAL mode, one row per live call keyed like the table's own
index, ``(public address, server, public Call ID)``.

Writing. GRE packets make no events; a call's row changes only when an
event names the call (CallMapped, CallEstablished, CallReleased).
:class:`Journal` notes the keys those events name and, once per turn of the
worker's loop, writes the current record of each (or deletes the row of a
call that is gone) in one transaction. ``synchronous=NORMAL``: a commit is a
``write()`` to the WAL file, no fsync, so it survives the worker's death
(SIGKILL) but the last commits before a power loss may be lost. A failed
write is counted (``state_error``), logged, and retried at the next turn;
the worker never stops for it.

Idle time. Per-packet activity is not written. The journal writes
``alive_at`` (wall clock) whenever the loop handled packets, at most every
:data:`HEARTBEAT` seconds. On restart the calls come back as if last seen
at ``alive_at``: the time the worker was down counts as idle time (no GRE
passed), so a call that was idle long enough before and during the gap is
released by the first timer, and none lives more than
``call_idle_timeout`` past the last packet the old worker saw (plus
``HEARTBEAT``).

Reading. A missing file is created, private to root (reported: the worker
starts with an empty table); an existing one is made 0600 again. A symbolic
link, or anything but a regular file, at the state path (or its ``-wal``,
``-shm``, ``.lock``) is refused: the worker keeps no state. A file that is
*corrupt* (SQLite says so: SQLITE_CORRUPT, SQLITE_NOTADB, a failed
``quick_check``) or has another schema is moved aside as
``<file>.corrupt-<time>`` (reported and counted, the worker starts clean).
A file that is fine but *cannot be written* (a full disk, a read-only file
system, no permission for ``-wal``: any other error) is never moved: its
calls are read read-only and restored, the worker keeps them in memory
only (``state_error`` counted and logged: :class:`StateUnwritable`), and the
next start, once the disk is writable, restores them again from the file
as it was. A file written in another boot or another network namespace
(its ``identity``) holds calls that cannot be live here: reported, emptied,
and the worker starts clean. Rows that do not make a valid record, and
records the table refuses (``Translator.restore``: the running policy's
rules), are reported by reason.

One worker per file: the file is locked (``flock`` on ``<file>.lock``) while
a worker uses it; a second worker pointed at the same file runs without
persistence and says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import sqlite3
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol, runtime_checkable

from . import CallEstablished, CallInfo, CallMapped, CallRecord, CallReleased, Event

log = logging.getLogger("natedit")

DEFAULT_STATE_FILE = "/var/lib/natedit/state.db"
SCHEMA_VERSION = 1
HEARTBEAT = 5.0
"""Seconds between two writes of ``alive_at`` while packets flow."""
SO_NETNS_COOKIE = 71
"""Linux >= 5.14: a 64-bit cookie of the socket's network namespace, never reused in a boot."""

Key = tuple[str, str, int]
"""(public address, server address, public Call ID)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS calls (
    public_address TEXT NOT NULL,
    server_address TEXT NOT NULL,
    public_call_id INTEGER NOT NULL,
    client_address TEXT NOT NULL,
    client_port INTEGER NOT NULL,
    server_port INTEGER NOT NULL,
    client_call_hi INTEGER NOT NULL,
    client_call_id INTEGER,
    server_call_id INTEGER,
    state TEXT NOT NULL,
    PRIMARY KEY (public_address, server_address, public_call_id)
) WITHOUT ROWID;
"""
_COLUMNS = ("public_address", "server_address", "public_call_id", "client_address",
            "client_port", "server_port", "client_call_hi", "client_call_id",
            "server_call_id", "state")
_UPSERT = f"INSERT OR REPLACE INTO calls ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 10)})"
_DELETE = "DELETE FROM calls WHERE public_address = ? AND server_address = ? AND public_call_id = ?"


class StateBusy(Exception):
    """Another worker holds the state file."""


def host_identity() -> str:
    """This boot and network namespace: calls recorded elsewhere cannot be live here."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            cookie = struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
        netns = f"netns-cookie-{cookie[0]}"
    except OSError:  # an older kernel: the namespace's inode (may be reused, rarely)
        netns = f"netns-inode-{os.stat('/proc/self/ns/net').st_ino}"
    return f"{boot}/{netns}"


def record_row(rec: CallRecord) -> tuple[object, ...]:
    return (str(rec.public_address), str(rec.server_address), rec.public_call_id,
            str(rec.client_address), rec.client_port, rec.server_port, rec.client_call_hi,
            rec.client_call_id, rec.server_call_id, rec.state)


def row_record(row: tuple[object, ...]) -> CallRecord | None:
    """The record a row holds, or None when it holds no valid one."""
    if len(row) != len(_COLUMNS):
        return None
    pub, server, pcid, client, cport, sport, hi, ccid, scid, state = row
    if not (isinstance(pcid, int) and isinstance(cport, int) and isinstance(sport, int)
            and isinstance(hi, int) and (ccid is None or isinstance(ccid, int))
            and (scid is None or isinstance(scid, int)) and isinstance(state, str)
            and isinstance(pub, str) and isinstance(server, str) and isinstance(client, str)):
        return None
    try:
        return CallRecord(IPv4Address(client), cport, IPv4Address(server), sport,
                          IPv4Address(pub), pcid, hi, ccid, scid, state)
    except ValueError:
        return None


@dataclass
class Loaded:
    """What :meth:`StateStore.open` found."""

    records: list[CallRecord] = field(default_factory=list)
    downtime: float = 0.0
    """Seconds between the last ``alive_at`` and now (0 if unknown)."""
    created: bool = False
    """No file was there: a new one was made."""
    problem: str | None = None
    """Why the file could not be used (corrupt, other schema): moved aside, started clean."""
    moved_to: str | None = None
    foreign: str | None = None
    """The file belonged to another boot or network namespace: emptied, started clean."""
    invalid_rows: int = 0


class StateStore:
    """One SQLite file in WAL mode holding the live calls; see the module docstring."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self._db = conn
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, identity: str | None = None,
             clock: Callable[[], float] = time.time) -> tuple[StateStore, Loaded]:
        """Lock and open ``path``, read the calls it holds.

        Raises StateBusy, StateUnwritable (with the calls read read-only), OSError
        (a symbolic link or not a regular file: refused; or nothing readable at all).
        """
        path = Path(path)
        identity = identity if identity is not None else host_identity()
        _refuse_links(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                              | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if not path.exists():
                raise
            raise StateUnwritable(str(exc), _read_only(path, identity, clock())) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StateBusy(f"{path} is in use by another natedit worker") from None
        try:
            return cls._open_locked(path, lock_fd, identity, clock)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, path: Path, lock_fd: int, identity: str,
                     clock: Callable[[], float]) -> tuple[StateStore, Loaded]:
        loaded = Loaded()
        db: sqlite3.Connection | None = None
        try:
            loaded.created = not _private_regular_file(path)
            db = _connect(path)
            loaded.records, loaded.downtime, loaded.invalid_rows, loaded.foreign = _read(
                db, identity, clock())
            return cls(path, db, lock_fd), loaded
        except StateRefused:
            raise
        except (sqlite3.Error, OSError, _Unusable) as exc:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            if not _corrupt(exc):  # fine but not writable here: leave it as it is
                raise StateUnwritable(str(exc) or type(exc).__name__,
                                      _read_only(path, identity, clock())) from exc
            loaded.problem = str(exc) or type(exc).__name__
        loaded.moved_to = _move_aside(path, clock())
        loaded.records, loaded.downtime, loaded.invalid_rows = [], 0.0, 0
        try:
            _private_regular_file(path)
            db = _connect(path)
            _read(db, identity, clock())
        except (sqlite3.Error, OSError, _Unusable) as exc:
            raise StateUnwritable(f"{loaded.problem}; moved to {loaded.moved_to}, and a new "
                                  f"file cannot be made: {exc}", Loaded()) from exc
        return cls(path, db, lock_fd), loaded

    def write(self, upserts: Iterable[CallRecord], deletes: Iterable[Key],
              alive_at: float | None) -> None:
        """One transaction: these rows written, those removed, ``alive_at`` noted."""
        with self._db:
            self._db.executemany(_UPSERT, (record_row(r) for r in upserts))
            self._db.executemany(_DELETE, deletes)
            if alive_at is not None:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('alive_at', ?)",
                                 (repr(alive_at),))

    def replace_all(self, records: Iterable[CallRecord], alive_at: float) -> None:
        """Make the file hold exactly ``records`` (after a restore)."""
        with self._db:
            self._db.execute("DELETE FROM calls")
            self._db.executemany(_UPSERT, (record_row(r) for r in records))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('alive_at', ?)",
                             (repr(alive_at),))

    def rows(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM calls").fetchone()[0])

    def records(self) -> list[CallRecord]:
        out = []
        for row in self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM calls"):
            rec = row_record(row)
            if rec is not None:
                out.append(rec)
        return out

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        os.close(self._lock_fd)


class _Unusable(Exception):
    """A readable SQLite file that is not a natedit state file of this schema."""


class StateRefused(OSError):
    """The state path is a symbolic link or not a regular file: natedit does not use it."""


class StateUnwritable(Exception):
    """The state file is fine (or absent) but cannot be written here: a full disk, a
    read-only file system, no permission. ``loaded`` holds what it was read to hold
    (read-only); the file is left exactly as it was."""

    def __init__(self, reason: str, loaded: Loaded) -> None:
        super().__init__(reason)
        self.reason = reason
        self.loaded = loaded


_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
"""SQLite's primary result codes that say the file itself is damaged."""


def _corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the file is damaged (move it aside), not that it cannot be
    written (leave it: the next start may write it)."""
    if isinstance(exc, _Unusable):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _CORRUPT


def _refuse_links(path: Path) -> None:
    """OSError when the state path, or a file SQLite or the lock keep beside it, is a
    symbolic link (dangling or not) or not a regular file."""
    for name in (str(path), f"{path}-wal", f"{path}-shm", f"{path}.lock"):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise StateRefused(errno.ELOOP, "a symbolic link: refused, natedit does not follow "
                                            "one (give the path of a regular file)", name)
        if not stat.S_ISREG(st.st_mode):
            raise StateRefused(errno.EINVAL, "not a regular file: refused", name)


def _private_regular_file(path: Path) -> bool:
    """Make ``path`` a regular file only root reads (0600, its -wal and -shm too);
    whether it was there already. Creates it (empty) when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600))
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateRefused(errno.EINVAL, "not a regular file: refused", str(path))
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.lstat(f"{path}{suffix}").st_mode) != 0o600:
                os.chmod(f"{path}{suffix}", 0o600, follow_symlinks=False)
    return True


def _read_only(path: Path, identity: str, now: float) -> Loaded:
    """What the file holds, read without writing anything (nothing when it cannot be
    read at all): read-only first, then as an immutable file (the main file only,
    when even the -shm index cannot be made)."""
    for query in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"file:{path}?{query}", uri=True, check_same_thread=False)
        except sqlite3.Error:
            continue
        try:
            records, downtime, invalid, foreign = _read(db, identity, now, write=False)
            return Loaded(records=records, downtime=downtime, invalid_rows=invalid,
                          foreign=foreign)
        except (sqlite3.Error, _Unusable):
            continue
        finally:
            db.close()
    return Loaded()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise _Unusable(f"journal mode {mode}, not wal")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=1000")
        return db
    except BaseException:
        db.close()
        raise


def _read(db: sqlite3.Connection, identity: str, now: float, *,
          write: bool = True) -> tuple[list[CallRecord], float, int, str | None]:
    """(records, downtime, invalid rows, foreign identity); a new file gets the schema
    (a foreign one is emptied) unless ``write`` is False."""
    check = db.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise _Unusable(f"quick_check: {check}")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables and not write:
        return [], 0.0, 0, None
    if not tables:
        with db:
            db.executescript(_SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema_version", str(SCHEMA_VERSION)), ("identity", identity)])
        return [], 0.0, 0, None
    if not {"meta", "calls"} <= tables:
        raise _Unusable(f"not a natedit state file (tables {sorted(tables)})")
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise _Unusable(f"schema version {meta.get('schema_version')!r}, "
                        f"this natedit reads {SCHEMA_VERSION}")
    if meta.get("identity") != identity and not write:
        return [], 0.0, 0, str(meta.get("identity"))
    if meta.get("identity") != identity:
        with db:
            db.execute("DELETE FROM calls")
            db.execute("DELETE FROM meta WHERE key = 'alive_at'")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (identity,))
        return [], 0.0, 0, str(meta.get("identity"))
    records: list[CallRecord] = []
    invalid = 0
    for row in db.execute(f"SELECT {', '.join(_COLUMNS)} FROM calls"):
        rec = row_record(row)
        if rec is None:
            invalid += 1
        else:
            records.append(rec)
    downtime = 0.0
    with contextlib.suppress(KeyError, ValueError):
        downtime = max(0.0, now - float(meta["alive_at"]))
    return records, downtime, invalid, None


def _move_aside(path: Path, now: float) -> str | None:
    """Rename an unusable file (and its -wal, -shm) out of the way; its new name."""
    target = f"{path}.corrupt-{int(now)}"
    moved = None
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            try:
                src.replace(f"{target}{suffix}")
                moved = moved or target
            except OSError:
                with contextlib.suppress(OSError):
                    src.unlink()
    return moved


# -- the worker's side -----------------------------------------------------------------


class Store(Protocol):
    """Where a :class:`Journal` writes: :class:`StateStore` (SQLite) or
    :class:`natedit.redisstate.RedisStore`; a failed write raises OSError or sqlite3.Error."""

    @property
    def path(self) -> object: ...
    def write(self, upserts: Iterable[CallRecord], deletes: Iterable[Key],
              alive_at: float | None) -> None: ...
    def replace_all(self, records: Iterable[CallRecord], alive_at: float) -> None: ...
    def rows(self) -> int: ...
    def close(self) -> None: ...


class Journal:
    """Writes the calls that events name, once per turn of the worker's loop.

    ``lookup`` is ``Translator.call_record``: the record of the live call now
    holding a public Call ID, or None once it is gone.
    """

    def __init__(self, store: Store, lookup: Callable[[CallInfo], CallRecord | None],
                 counts: MutableMapping[str, int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.lookup = lookup
        self.counts: MutableMapping[str, int] = counts if counts is not None else {}
        self.clock = clock
        self._dirty: dict[Key, CallInfo] = {}
        self._alive_written = 0.0
        self._last_error_log = -1e9
        self.writes = 0
        """Transactions committed."""

    def note(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, CallMapped | CallEstablished | CallReleased):
                info = event.call
                key = (str(info.public_address), str(info.server_address), info.public_call_id)
                self._dirty[key] = info

    @property
    def pending(self) -> int:
        return len(self._dirty)

    def commit(self, *, activity: bool = True) -> None:
        """Write what changed (and ``alive_at`` when due); never raises."""
        now = self.clock()
        alive = now if activity and now - self._alive_written >= HEARTBEAT else None
        if not self._dirty and alive is None:
            return
        dirty, self._dirty = self._dirty, {}
        upserts: list[CallRecord] = []
        deletes: list[Key] = []
        for key, info in dirty.items():
            rec = self.lookup(info)
            if rec is None:
                deletes.append(key)
            else:
                upserts.append(rec)
        try:
            self.store.write(upserts, deletes, alive)
        except (sqlite3.Error, OSError) as exc:
            self._dirty = {**dirty, **self._dirty}  # retried at the next turn
            self.counts["state_error"] = self.counts.get("state_error", 0) + 1
            if now - self._last_error_log >= 1.0:
                self._last_error_log = now
                log.error("state_error: cannot write the state file %s: %s",
                          self.store.path, exc)
            return
        self.writes += 1
        if alive is not None:
            self._alive_written = now

    def close(self) -> None:
        self.commit()
        self.store.close()


def restore_into(translator: RestoringTranslator, path: str, counts: MutableMapping[str, int],
                 *, monotonic: Callable[[], float] = time.monotonic,
                 identity: str | None = None) -> Journal | None:
    """Open ``path``, put its calls back into ``translator``, log what happened.

    Returns the journal the worker writes through, or None (no persistence:
    the file is in use by another worker, or cannot be opened at all).
    """
    try:
        store, loaded = StateStore.open(path, identity=identity)
    except StateBusy as exc:
        log.warning("%s; this worker keeps no state", exc)
        return None
    except StateUnwritable as exc:
        counts["state_error"] = counts.get("state_error", 0) + 1
        log.error("state_error: cannot write the state file %s (%s); left as it is: its %d "
                  "calls read to be restored, kept in memory only (this worker keeps no "
                  "state); the next start restores them from the file", path, exc.reason,
                  len(exc.loaded.records))
        _restore(translator, path, exc.loaded, monotonic)
        return None
    except OSError as exc:
        counts["state_error"] = counts.get("state_error", 0) + 1
        log.error("state_error: cannot open the state file %s (%s); this worker keeps no state",
                  path, exc)
        return None
    if loaded.problem is not None:
        counts["state_unusable"] = counts.get("state_unusable", 0) + 1
        log.error("state_unusable: the state file %s cannot be used (%s); moved to %s, "
                  "starting with an empty call table", path, loaded.problem, loaded.moved_to)
    elif loaded.created:
        log.info("no state file at %s: created, starting with an empty call table", path)
    elif loaded.foreign is not None:
        log.info("the state file %s was written in another boot or network namespace; "
                 "starting with an empty call table", path)
    _restore(translator, path, loaded, monotonic)
    try:
        store.replace_all(translator.snapshot(), time.time())
    except (sqlite3.Error, OSError) as exc:
        counts["state_error"] = counts.get("state_error", 0) + 1
        log.error("state_error: cannot write the state file %s: %s", path, exc)
    return Journal(store, translator.call_record, counts)


def _restore(translator: RestoringTranslator, path: str, loaded: Loaded,
             monotonic: Callable[[], float]) -> None:
    """Put ``loaded``'s calls back into ``translator`` and log how many, and why not."""
    outcome = translator.restore(loaded.records, monotonic() - loaded.downtime)
    if loaded.invalid_rows:
        outcome["invalid"] += loaded.invalid_rows
    restored = outcome.pop("restored", 0)
    if loaded.records or loaded.invalid_rows:
        skipped = " ".join(f"{k}={v}" for k, v in sorted(outcome.items()))
        log.info("event=state_restored path=%s calls=%d down_seconds=%.1f%s", path, restored,
                 loaded.downtime, f" skipped {skipped}" if skipped else "")


@runtime_checkable
class RestoringTranslator(Protocol):
    """What :func:`restore_into` uses of :class:`natedit.core.translator.Translator`."""

    def restore(self, records: Iterable[CallRecord], now: float) -> Counter[str]: ...
    def snapshot(self) -> list[CallRecord]: ...
    def call_record(self, info: CallInfo) -> CallRecord | None: ...


@contextlib.contextmanager
def journal(translator: object, path: str | None, counts: MutableMapping[str, int],
            followed: list[CallRecord] | None = None) -> Iterator[Journal | None]:
    """The worker's persistence for its lifetime: restored at entry, flushed at exit.

    ``path`` is a file (SQLite) or a ``redis://`` URL (:mod:`natedit.redisstate`);
    ``followed``: with Redis, the table a follower kept (:mod:`natedit.pair`), restored
    instead of reading it again."""
    if not path:
        yield None
        return
    if not isinstance(translator, RestoringTranslator):
        log.warning("this translator cannot persist its calls; no state kept")
        yield None
        return
    j: Journal | None
    if path.startswith(("redis://", "rediss://", "unix://")):
        from . import redisstate

        j = redisstate.restore_into(translator, path, counts, followed)
    else:
        j = restore_into(translator, path, counts)
    try:
        yield j
    finally:
        if j is not None:
            j.close()
