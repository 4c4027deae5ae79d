"""The reason enums of natedit.core.errors: the closed sets the edges count by.

The metric label values natedit exports (and dashboards and alerts use) are these
enums' values: they are pinned here, so renaming one is a deliberate change. What
the core gives, it gives as members (tests/unit/test_fuzz_quick.py holds every
verdict, event and ProtocolError of its runs to that; mypy --strict holds the code).
"""

from __future__ import annotations

from natedit import errors
from natedit.core.errors import (
    ACL_REFUSALS,
    DropReason,
    Malformed,
    PassReason,
    ProtocolError,
    Refusal,
    ReleaseReason,
    RestoreOutcome,
)
from natedit.core.wire import MessageType as MT
from natedit.core.wire import parse_control_header, parse_gre
from tests.pptp_flows import (
    IN,
    OUT,
    Conversation,
    establish,
    gre_in,
    make_translator,
    msg,
    run_timers,
)


def test_values_are_the_exported_labels() -> None:
    assert [r.value for r in ReleaseReason] == [
        "disconnect", "stop", "fin", "reset", "idle", "request_timeout", "clear_timeout",
        "control_idle", "refused_by_server", "refused_by_client", "replaced",
        "public_address_changed"]
    assert [r.value for r in Refusal] == [
        "not_started", "client_denied", "server_denied", "client_limit", "table_full",
        "pool_exhausted", "rate_limited", "not_public"]
    assert [r.value for r in Malformed] == [
        "short_ip", "not_ipv4", "bad_ip_header", "short_tcp", "bad_tcp_header", "short_gre",
        "short_header", "bad_pptp_type", "bad_cookie", "bad_message_type", "bad_length",
        "length_mismatch"]
    assert [r.value for r in PassReason] == [
        "unsynced", "duplicate_syn", "not_ours", "not_pptp_gre", "unknown_call_id",
        "split_call_id_undecided",
        "unexpected_message"]
    assert {r.value for r in DropReason} == {
        "gap", "no_call", "foreign_call_id", "fragment", "history_rewritten", "split_call_id",
        "too_many_connections",
        "client_connection_limit", *(f"refused:{r}" for r in Refusal)}
    assert {r.value for r in RestoreOutcome} == {
        "restored", "public_address", "client_address", "server_address", "invalid",
        "duplicate", "client_limit", "table_full", "too_many_connections"}


def test_each_refusal_has_its_drop_reason() -> None:
    """The computed reasons (refused:<why>) are members too, one per Refusal."""
    assert {r.drop for r in Refusal} == {d for d in DropReason if d.startswith("refused:")}
    assert Refusal.TABLE_FULL.drop is DropReason.REFUSED_TABLE_FULL
    assert set(ACL_REFUSALS) <= set(Refusal)


def test_members_are_their_strings() -> None:
    """StrEnum: counters keyed by a member are read by its string, and print as it."""
    assert str(ReleaseReason.IDLE) == "idle" and f"{ReleaseReason.IDLE}" == "idle"
    counts: dict[str, int] = {ReleaseReason.IDLE: 1}
    assert counts["idle"] == 1
    assert str(DropReason.REFUSED_RATE_LIMITED) == "refused:rate_limited"
    assert errors.Malformed is Malformed  # natedit.errors is the core's module


def test_the_reason_families_do_not_overlap() -> None:
    families: list[set[str]] = [set(Malformed), set(DropReason), set(PassReason)]
    assert sum(map(len, families)) == len(set().union(*families))


def test_parsers_raise_members() -> None:
    for data, parse in ((b"\x00" * 4, parse_control_header), (b"\x00" * 12, parse_gre)):
        try:
            parse(data)
        except ProtocolError as exc:
            assert isinstance(exc.reason, Malformed | PassReason)
        else:
            raise AssertionError("parsed")


def test_the_core_counts_by_members() -> None:
    """Release, refusal and verdict counters hold members, computed reasons included."""
    tr = make_translator(max_calls_per_client=1, request_timeout=10.0)
    conv = Conversation(tr, "10.0.0.5")
    conv.open()
    public = establish(conv, 0x1234, 0x80)
    assert not conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x2222)).accepted
    tr.handle_packet(gre_in(public ^ 1), IN, 1)
    conv.send(IN, msg(MT.CALL_DISCONNECT_NOTIFY, call_id=0x80))
    conv.send(OUT, msg(MT.OUTGOING_CALL_REQUEST, call_id=0x3333))
    run_timers(tr, 100.0)
    st = tr.stats
    assert set(st.calls_released) == {ReleaseReason.DISCONNECT, ReleaseReason.REQUEST_TIMEOUT}
    assert all(isinstance(r, ReleaseReason) for r in st.calls_released)
    assert set(st.calls_refused) == {Refusal.CLIENT_LIMIT}
    assert all(isinstance(r, Refusal) for r in st.calls_refused)
    assert {r for _, r in st.verdicts} == {DropReason.REFUSED_CLIENT_LIMIT, DropReason.NO_CALL}
    assert all(isinstance(r, DropReason) for _, r in st.verdicts)
