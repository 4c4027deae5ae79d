"""The call table across restarts: records, restore, the SQLite state file, the journal.

Core: ``Translator.snapshot`` / ``call_record`` / ``restore`` keep every
invariant of the table (``assert_table_consistent``) and give the calls their
public Call IDs back, so GRE flows at once. Edge: ``natedit.state`` in a
temporary directory: a missing, corrupt, foreign or locked file, rows that
are not records, failed writes, the worker's Dispatcher writing through the
journal once per turn.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from natedit import Action, CallRecord, Direction, MessageType, state
from natedit.core.translator import Translator
from natedit.state import (
    HEARTBEAT,
    Journal,
    StateBusy,
    StateStore,
    journal,
    record_row,
    restore_into,
)
from natedit.worker import Dispatcher
from tests.harness.queued import give
from tests.pptp_flows import (
    IN,
    OUT,
    SERVER,
    Conversation,
    assert_table_consistent,
    establish,
    forward,
    gre_in,
    gre_out,
    make_translator,
    msg,
    payload_of,
    run_timers,
    u16,
)

MT = MessageType
ID = "boot-1/netns-1"


def busy_translator(n_clients: int = 3, calls_each: int = 2) -> Translator:
    """Several clients, several calls each (established, plus one requested)."""
    tr = make_translator()
    for i in range(n_clients):
        conv = Conversation(tr, f"10.0.0.{10 + i}", client_port=40000 + i)
        conv.open()
        for j in range(calls_each):
            establish(conv, 0x1200 + j, 0x80 * (i * calls_each + j + 1))
        forward(conv, OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x3400))
    assert_table_consistent(tr.table)
    return tr


def key(c: object) -> tuple[object, ...]:
    return tuple(getattr(c, f) for f in ("client_address", "client_call_id", "server_address",
                                           "server_call_id", "public_call_id", "state"))


# -- the core ---------------------------------------------------------------------------------


def test_snapshot_and_restore_give_the_same_table() -> None:
    old = busy_translator()
    records = old.snapshot()
    assert len(records) == 9
    new = make_translator()
    assert new.restore(records, 500.0) == Counter(restored=9)
    assert sorted(map(key, new.calls())) == sorted(map(key, old.calls()))
    assert sorted(new.snapshot(), key=str) == sorted(records, key=str)
    assert_table_consistent(new.table)
    assert new.table.per_client == old.table.per_client
    assert all(conn.started for conn in new.table.connections.values())
    assert all(s.next_seq is None for conn in new.table.connections.values()
               for s in conn.streams)  # unsynced until a segment starts with a header
    assert new.stats.calls_restored == 9


def test_restored_calls_carry_gre_at_once_both_ways() -> None:
    old = busy_translator(1, 1)
    (call,) = [c for c in old.calls() if c.state == "established"]
    new = make_translator()
    new.restore(old.snapshot(), 10.0)
    v_in = new.handle_packet(gre_in(call.public_call_id), IN, 10.0)
    assert v_in == old.handle_packet(gre_in(call.public_call_id), IN, 10.0)
    assert v_in.data is not None and v_in.data[16:20] == call.client_address.packed
    v_out = new.handle_packet(gre_out(str(call.client_address), 0x80), OUT, 10.0)
    assert v_out.data is not None and v_out.data[12:16] == call.public_address.packed


def test_restored_connection_resyncs_and_maps_control_messages() -> None:
    old = make_translator()
    conv = Conversation(old, "10.0.0.5")
    conv.open()
    public = establish(conv, 0x1234, 0x80)
    new = make_translator()
    new.restore(old.snapshot(), 0.0)
    conv.tr = new  # the same TCP connection goes on through the new worker
    echo = msg(MT.ECHO_REQUEST)
    v = conv.send(OUT, echo[:5])  # mid-message: passed untouched, not synchronised yet
    assert (v.action, v.reason) == (Action.ACCEPT, "unsynced")
    conv.send(OUT, echo[5:])
    out = forward(conv, OUT, msg(MT.CALL_CLEAR_REQUEST, call_id=0x1234))
    assert u16(payload_of(out), 12) == public  # synchronised on this header
    out = forward(conv, IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x80))
    assert u16(payload_of(out), 12) == 0x1234
    assert not new.calls()


def test_new_calls_after_a_restore_avoid_restored_ids() -> None:
    tr = make_translator(call_id_first=1, call_id_last=4)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    for cid in range(1, 4):
        establish(conv, cid, 0x80 + cid)
    new = make_translator(call_id_first=1, call_id_last=4)
    new.restore(tr.snapshot(), 0.0)
    other = Conversation(new, "10.0.0.6")
    other.open()
    public = establish(other, 0x0001, 0x90)
    assert public not in {c.public_call_id for c in tr.calls()}
    v = other.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x0002))
    assert v.reason == "refused:pool_exhausted"
    assert_table_consistent(new.table)


def rec(**kw: object) -> CallRecord:
    fields: dict[str, object] = dict(
        client_address=IPv4Address("10.0.0.5"), client_port=40000,
        server_address=IPv4Address(SERVER), server_port=1723,
        public_address=IPv4Address("198.51.100.1"), public_call_id=0x5001,
        client_call_hi=0x12, client_call_id=0x1234, server_call_id=0x80, state="established")
    fields.update(kw)
    return CallRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("second", [
    rec(public_call_id=0x6001, client_call_id=0x1299, server_call_id=0x81),  # 0x12: 0x50, 0x60
    rec(public_call_id=0x5002, client_call_hi=0x13, client_call_id=0x1399,
        server_call_id=0x81),  # public hi 0x50 with client his 0x12 and 0x13
], ids=["client_hi_in_two_blocks", "block_of_two_client_his"])
def test_restore_takes_back_calls_that_break_the_high_byte_rule(second: CallRecord) -> None:
    """Such rows were refused (``high_byte_rule``), so a restart lost every call the
    allocator mapped with the rule relaxed (issue 11, item 7); both come back now, and
    each is found by its whole Call IDs as before."""
    tr = make_translator()
    assert tr.restore([rec(), second], 0.0)["restored"] == 2
    assert_table_consistent(tr.table, one_to_one=False)
    conn = next(iter(tr.table.connections.values()))
    for r in (rec(), second):
        call = conn.call_by_client_id(r.client_call_id or 0)
        assert call is not None and call.public_call_id == r.public_call_id


def test_restore_takes_back_two_calls_sharing_a_server_call_id() -> None:
    """Two live calls of one client and server with one server Call ID (pptpd's wrap)
    were refused on restore as a duplicate (outbound GRE could not tell them apart);
    the table now keeps both (issue 11, item 8), so both come back."""
    tr = make_translator()
    records = [rec(), rec(client_port=40001, public_call_id=0x6001, client_call_hi=0x13,
                          client_call_id=0x1300)]
    assert tr.restore(records, 0.0)["restored"] == 2
    assert_table_consistent(tr.table)


@pytest.mark.parametrize(("records", "reason"), [
    ([rec(), rec(client_port=40001, client_call_id=0x1299)], "duplicate"),  # public ID taken
    ([rec(), rec(public_call_id=0x6001, server_call_id=0x81)], "duplicate"),  # client Call ID
    ([rec(public_address=IPv4Address("203.0.113.9"))], "public_address"),
    ([rec(state="dancing")], "invalid"),
    ([rec(client_call_id=0x1334)], "invalid"),  # high byte does not match
    ([rec(public_call_id=70000)], "invalid"),
    ([rec(client_port=0)], "invalid"),
    ([rec(server_call_id=-1)], "invalid"),
    ([rec(client_address=IPv4Address("0.0.0.0"))], "client_address"),
    ([rec(client_address=IPv4Address("192.0.2.7"))], "client_address"),  # not inside
    ([rec(server_address=IPv4Address("10.9.9.9"))], "server_address"),  # inside
    ([rec(server_address=IPv4Address("0.0.0.0"))], "server_address"),
])
def test_restore_keeps_the_invariants(records: list[CallRecord], reason: str) -> None:
    tr = make_translator()
    outcome = tr.restore(records, 0.0)
    assert outcome[reason] == 1 and outcome["restored"] == len(records) - 1
    assert_table_consistent(tr.table)


def test_restore_takes_back_a_call_whose_client_is_its_public_address() -> None:
    """The gateway's own client's call (issue 16 item 3: its "private" address is the
    public one) was refused as ``client_address`` before natedit mapped such calls."""
    tr = make_translator()
    assert tr.restore([rec(client_address=IPv4Address("198.51.100.1"))], 0.0) == {
        "restored": 1}
    assert_table_consistent(tr.table)


def test_restore_respects_the_limits() -> None:
    tr = make_translator(max_calls_per_client=2, max_calls=3, max_control_connections=2)
    records = [rec(client_port=40000 + i, public_call_id=0x5000 + 0x100 * i,
                   server_call_id=0x80 + i) for i in range(3)]  # 3 calls of 10.0.0.5
    records += [rec(client_address=IPv4Address(f"10.0.1.{i}"), client_port=41000 + i,
                    public_call_id=0x7000 + 0x100 * i, server_call_id=0x90 + i)
                for i in range(3)]
    outcome = tr.restore(records, 0.0)
    assert outcome == Counter(restored=2, client_limit=1, too_many_connections=3)
    assert_table_consistent(tr.table)


def test_restored_idle_timer_starts_from_the_given_time() -> None:
    old = busy_translator(1, 1)
    tr = make_translator(call_idle_timeout=300.0, request_timeout=60.0)
    tr.restore(old.snapshot(), 1000.0)
    assert tr.next_deadline() == 1060.0  # the requested call
    events = run_timers(tr, 1299.0)
    assert [(e.call.state, e.reason) for e in events] == [  # type: ignore[attr-defined]
        ("requested", "request_timeout")]
    assert len(tr.calls()) == 1
    run_timers(tr, 1300.0)
    assert not tr.calls()
    assert not tr.table.connections or all(
        not c.calls for c in tr.table.connections.values())


def test_call_record_follows_the_events() -> None:
    tr = make_translator()
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    v = conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
    (mapped,) = v.events
    rec1 = tr.call_record(mapped.call)  # type: ignore[union-attr]
    assert rec1 is not None and rec1.state == "requested" and rec1.server_call_id is None
    assert (rec1.client_port, rec1.server_port, rec1.client_call_hi) == (40000, 1723, 0x12)
    public = rec1.public_call_id
    conv.send(IN, msg(MT.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=public))
    rec2 = tr.call_record(mapped.call)  # type: ignore[union-attr]
    assert rec2 is not None and (rec2.state, rec2.server_call_id) == ("established", 0x80)
    conv.send(OUT, msg(MT.STOP_CONTROL_CONNECTION_REQUEST))
    assert tr.call_record(mapped.call) is None  # type: ignore[union-attr]


# -- the state file ---------------------------------------------------------------------------


def test_missing_file_is_created_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    store, loaded = StateStore.open(path, identity=ID)
    assert loaded.created and not loaded.records and loaded.problem is None
    records = busy_translator().snapshot()
    store.write(records, [], alive_at=123.0)
    store.close()
    store, loaded = StateStore.open(path, identity=ID, clock=lambda: 130.0)
    assert not loaded.created
    assert sorted(loaded.records, key=str) == sorted(records, key=str)
    assert loaded.downtime == 7.0
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()}
    assert modes == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600,
                     "state.db.lock": 0o600}
    assert path.parent.stat().st_mode & 0o777 == 0o700
    store.close()


@pytest.mark.parametrize("content", [
    b"this is not a database at all" * 100,
    b"SQLite format 3\x00" + bytes(200),  # a damaged header
    b"",  # an empty file is a new database: not a problem
])
def test_corrupt_file_is_moved_aside_and_the_table_starts_clean(
        tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(content)
    store, loaded = StateStore.open(path, identity=ID, clock=lambda: 1700000000.0)
    if not content:
        assert loaded.problem is None
    else:
        assert loaded.problem and loaded.moved_to == f"{path}.corrupt-1700000000"
        assert Path(loaded.moved_to).read_bytes() == content  # kept for a post-mortem
    assert not loaded.records
    store.write(busy_translator(1, 1).snapshot(), [], None)  # the new file works
    assert store.rows() == 2
    store.close()


def test_a_damaged_page_is_found(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store, _ = StateStore.open(path, identity=ID)
    many = [rec(client_address=IPv4Address(f"10.1.{i // 200}.{i % 200}"), client_port=1 + i,
                public_call_id=i + 1, client_call_hi=0, client_call_id=1, server_call_id=i)
            for i in range(3000)]
    store.write(many, [], None)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[5 * 4096 : 5 * 4096 + 300] = b"\xa5" * 300  # scribble over a b-tree page
    path.write_bytes(bytes(data))
    store, loaded = StateStore.open(path, identity=ID)
    assert loaded.problem is not None and not loaded.records
    store.close()


def test_another_schema_is_unusable(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE something (x)")
    db.commit()
    db.close()
    store, loaded = StateStore.open(path, identity=ID)
    assert loaded.problem is not None and "not a natedit state file" in loaded.problem
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    store, loaded = StateStore.open(path, identity=ID)
    assert loaded.problem == "schema version '99', this natedit reads 1"
    store.close()


def test_a_file_of_another_boot_or_namespace_starts_clean(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store, _ = StateStore.open(path, identity="boot-0/netns-9")
    store.write(busy_translator(1, 1).snapshot(), [], 5.0)
    store.close()
    store, loaded = StateStore.open(path, identity=ID)
    assert loaded.foreign == "boot-0/netns-9" and not loaded.records and not loaded.problem
    assert store.rows() == 0
    store.close()


def test_rows_that_are_not_records_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store, _ = StateStore.open(path, identity=ID)
    good = rec()
    store.write([good], [], None)
    store.close()
    db = sqlite3.connect(path)
    for row in ([*record_row(good)[:2], 7, "not an address", *record_row(good)[4:]],
                [*record_row(good)[:2], 8, *record_row(good)[3:4], "x", *record_row(good)[5:]]):
        db.execute("INSERT INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    db.commit()
    db.close()
    store, loaded = StateStore.open(path, identity=ID)
    assert loaded.records == [good] and loaded.invalid_rows == 2
    store.close()


def test_one_worker_per_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    store, _ = StateStore.open(path, identity=ID)
    with pytest.raises(StateBusy):
        StateStore.open(path, identity=ID)
    counts: Counter[str] = Counter()
    with caplog.at_level(logging.WARNING, "natedit"):
        assert restore_into(make_translator(), str(path), counts, identity=ID) is None
    assert "in use by another natedit worker; this worker keeps no state" in caplog.text
    assert not counts
    store.close()
    j = restore_into(make_translator(), str(path), counts, identity=ID)
    assert j is not None
    j.close()


@pytest.mark.parametrize("dangling", [False, True])
@pytest.mark.parametrize("suffix", ["", "-wal", ".lock"])
def test_a_symbolic_link_at_the_state_path_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, dangling: bool, suffix: str) -> None:
    path = tmp_path / "state.db"
    target = tmp_path / "elsewhere"
    if not dangling:
        target.write_bytes(b"")
    Path(f"{path}{suffix}").symlink_to(target)
    counts: Counter[str] = Counter()
    with caplog.at_level(logging.ERROR, "natedit"):
        assert restore_into(make_translator(), str(path), counts, identity=ID) is None
    assert counts == Counter(state_error=1)
    assert "a symbolic link: refused" in caplog.text
    assert target.exists() is not dangling  # nothing created through the link
    if not dangling:
        assert target.read_bytes() == b""


def test_a_fifo_at_the_state_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    os.mkfifo(path)
    with pytest.raises(OSError, match="not a regular file"):
        StateStore.open(path, identity=ID)


def test_an_existing_file_is_made_private_again(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store, _ = StateStore.open(path, identity=ID)
    store.write(busy_translator(1, 1).snapshot(), [], None)
    store.close()
    path.chmod(0o644)
    store, loaded = StateStore.open(path, identity=ID)
    assert len(loaded.records) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    assert all(Path(f"{path}{s}").stat().st_mode & 0o777 == 0o600 for s in ("-wal", "-shm"))
    store.close()


def test_a_file_that_cannot_be_written_is_read_and_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """SQLite failing to make -wal (a full disk: SQLITE_IOERR_SHMSIZE) is not corruption.
    tests/netns/test_state_disk.py does it on a real full and a real read-only tmpfs."""
    path = tmp_path / "state.db"
    old = busy_translator(1, 2)
    store, _ = StateStore.open(path, identity=ID)
    store.replace_all(old.snapshot(), 1.0)
    store.close()
    content = path.read_bytes()

    def full(_path: Path) -> sqlite3.Connection:
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = 4874  # SQLITE_IOERR_SHMSIZE
        raise exc

    monkeypatch.setattr(state, "_connect", full)
    counts: Counter[str] = Counter()
    new = make_translator()
    with caplog.at_level(logging.INFO, "natedit"):
        assert restore_into(new, str(path), counts, identity=ID) is None
    assert counts == Counter(state_error=1)
    assert sorted(map(key, new.calls())) == sorted(map(key, old.calls()))
    assert "cannot write the state file" in caplog.text and "3 calls read" in caplog.text
    assert not [p for p in tmp_path.iterdir() if "corrupt" in p.name]  # nothing moved aside
    assert path.read_bytes() == content


def test_unwritable_place_is_an_error_not_a_crash(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    counts: Counter[str] = Counter()
    with caplog.at_level(logging.ERROR, "natedit"):
        assert restore_into(make_translator(), str(blocker / "state.db"), counts) is None
    assert counts == Counter(state_error=1)
    assert "state_error: cannot open the state file" in caplog.text


# -- the journal and the worker ---------------------------------------------------------------


def test_restore_into_puts_back_the_calls_and_reports(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    old = busy_translator()
    store, _ = StateStore.open(path, identity=ID)
    store.write([*old.snapshot(), rec(public_address=IPv4Address("203.0.113.9"))], [], None)
    store.close()
    new = make_translator()
    counts: Counter[str] = Counter()
    with caplog.at_level(logging.INFO, "natedit"):
        j = restore_into(new, str(path), counts, identity=ID, monotonic=lambda: 50.0)
    assert j is not None
    assert sorted(map(key, new.calls())) == sorted(map(key, old.calls()))
    assert ("event=state_restored path=" in caplog.text
            and "calls=9 down_seconds=0.0 skipped public_address=1" in caplog.text)
    assert j.store.rows() == 9  # the file now holds exactly the restored table
    j.close()


def test_corrupt_file_through_restore_into_is_counted(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"garbage" * 1000)
    counts: Counter[str] = Counter()
    with caplog.at_level(logging.ERROR, "natedit"):
        j = restore_into(make_translator(), str(path), counts, identity=ID)
    assert j is not None
    assert counts == Counter(state_unusable=1)
    assert "state_unusable: the state file" in caplog.text and ".corrupt-" in caplog.text
    j.close()


def test_journal_writes_what_events_name_once_per_turn(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    tr = make_translator()
    clock = [1000.0]
    store, _ = StateStore.open(path, identity=ID)
    j = Journal(store, tr.call_record, clock=lambda: clock[0])
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    for mt_msg in (msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234),):
        j.note(conv.send(OUT, mt_msg).events)
    public = tr.calls()[0].public_call_id
    j.note(conv.send(IN, msg(MT.OUTGOING_CALL_REPLY, call_id=0x80,
                             peer_call_id=public)).events)
    assert j.pending == 1  # two events, one call
    j.commit()
    assert j.writes == 1 and store.records() == tr.snapshot()
    for _ in range(100):  # GRE makes no events and no writes
        assert not tr.handle_packet(gre_in(public), IN, 1.0).events
    j.commit()
    assert j.writes == 1  # nothing to write, alive_at not due
    clock[0] += HEARTBEAT
    j.commit()
    assert j.writes == 2  # the heartbeat
    j.note(conv.send(OUT, msg(MT.STOP_CONTROL_CONNECTION_REQUEST)).events)
    j.commit()
    assert store.rows() == 0
    j.close()


def test_a_failed_write_is_counted_and_retried(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    tr = make_translator()
    store, _ = StateStore.open(tmp_path / "state.db", identity=ID)
    counts: Counter[str] = Counter()
    j = Journal(store, tr.call_record, counts)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    j.note(conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234)).events)
    real = store.write

    def failing(*args: object, **kw: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    store.write = failing  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "natedit"):
        j.commit()
    assert counts == Counter(state_error=1) and j.pending == 1
    assert "state_error: cannot write the state file" in caplog.text
    store.write = real  # type: ignore[method-assign]
    j.commit()
    assert j.pending == 0 and store.rows() == 1
    j.close()


class FakePacket:
    id = 1

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        self.payload = payload

    def accept(self) -> None:
        pass

    def drop(self) -> None:
        pass


def test_dispatcher_persists_through_the_journal(tmp_path: Path) -> None:
    """The worker's path without the kernel: packets through the Dispatcher, a flush per
    turn; a second worker (a new translator on the same file) has the calls back."""
    path = str(tmp_path / "state.db")
    tr = make_translator()
    d = Dispatcher(tr, clock=lambda: 5.0)
    with journal(tr, path, d.counts) as j:
        assert j is not None
        d.journal = j
        conv = Conversation(tr, "10.0.0.5")
        packets: list[tuple[bytes, Direction]] = []
        conv.tr = _Recorder(packets)  # type: ignore[assignment]
        conv.open()
        conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x1234))
        for packet, direction in packets:
            give(d.packets, FakePacket(packet), direction)
        d.flush()
        public = tr.calls()[0].public_call_id
        reply = conv.segment(IN, msg(MT.OUTGOING_CALL_REPLY, call_id=0x80, peer_call_id=public))
        give(d.packets, FakePacket(reply), IN)
        d.flush()
        before = tr.snapshot()
    # "kill -9": nothing more is written; a new worker opens the same file
    tr2 = make_translator()
    with journal(tr2, path, Counter()) as j2:
        assert j2 is not None
        assert tr2.snapshot() == before and before[0].state == "established"
        gre = tr2.handle_packet(gre_in(public), IN, 1.0)
        assert gre.data is not None and struct.unpack_from("!H", gre.data, 26)[0] == 0x1234


class _Recorder:
    """Stands in for a translator in a Conversation: records what it is fed."""

    def __init__(self, packets: list[tuple[bytes, Direction]]) -> None:
        self.packets = packets

    def handle_packet(self, data: bytes, direction: Direction, now: float) -> object:
        self.packets.append((data, direction))
        return _Accepted()


class _Accepted:
    accepted = True
    events = ()
