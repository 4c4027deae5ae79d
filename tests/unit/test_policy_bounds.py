"""A policy file is bounded: its size, its nesting, its numbers, its lists, the kind of
file it is. Whatever a file holds, every way of loading it (``natedit run``,
``check-policy``, ``natedit reload``/SIGHUP, the Python API) gets a
:class:`PolicyError` with one line per problem, never another exception, and a
reload that gets one keeps the running policy (issue 11, item 4).

tests/netns/test_e2e_policy.py sends such a file to a real worker on reload.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natedit import Policy, PolicyError, cli, host, reload
from natedit.policyfile import (
    FIELDS,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NETWORKS,
    MAX_PROBLEMS,
    parse_policy,
    read_policy,
)
from natedit.status import PolicyStatus

DEEP = "x: " + "[" * 5000 + "\n"
"""The file that killed a real worker on reload (RecursionError)."""

HOSTILE: list[tuple[str, str, str]] = [
    ("5,000 [", DEEP, "p.yaml:1: not valid YAML: nested deeper than 16 levels"),
    ("5,000 {", "x: " + "{a: " * 5000 + "\n",
     "p.yaml:1: not valid YAML: nested deeper than 16 levels"),
    ("500 block levels", "".join(f"{' ' * i}a:\n" for i in range(500)),
     "p.yaml:16: not valid YAML: nested deeper than 16 levels"),
    ("nested under a real field", "inside_networks: " + "[" * 40 + "]" * 40 + "\n",
     "p.yaml:1: not valid YAML: nested deeper than 16 levels"),
    ("a 5,000-digit integer", "limits: {max_calls: " + "9" * 5000 + "}\n",
     "p.yaml:1: limits.max_calls: expected an integer from 1 to 65535, found a number of "
     "5000 characters"),
    ("a 400-digit burst", "limits: {new_calls_burst: " + "9" * 400 + "}\n",
     "p.yaml:1: limits.new_calls_burst: expected an integer from 1 to 65535, found a "
     "number of 400 characters"),
    ("a 400-digit max_calls", "limits: {max_calls: " + "9" * 400 + "}\n",
     "p.yaml:1: limits.max_calls: expected an integer from 1 to 65535, found a number of "
     "400 characters"),
    ("a 5,000-digit float", "timeouts: {request: " + "9" * 5000 + ".5}\n",
     "p.yaml:1: timeouts.request: expected seconds, more than 0 and at most 604800, found "
     "a number of 5002 characters"),
    ("an integer over the bound", "limits: {max_calls: 65536}\n",
     "p.yaml:1: limits.max_calls: expected an integer from 1 to 65535, found 65536"),
    ("2**63 connections", f"limits: {{max_control_connections: {2**63}}}\n",
     "p.yaml:1: limits.max_control_connections: expected an integer from 1 to 1000000, "
     f"found {2**63}"),
    ("a date that is none", "limits: {max_calls: 2001-02-30}\n",
     "p.yaml:1: limits.max_calls: not a plain YAML value: day is out of range for month"),
    ("!!int on a word", "limits: {max_calls: !!int many}\n",
     "p.yaml:1: limits.max_calls: not a plain YAML value: invalid literal for int() with "
     "base 10: 'many'"),
    ("!!float on a word", "timeouts: {request: !!float soon}\n",
     "p.yaml:1: timeouts.request: not a plain YAML value: could not convert string to "
     "float: 'soon'"),
    ("an unknown tag", "limits: {max_calls: !bignum 5}\n",
     "p.yaml:1: limits.max_calls: not a plain YAML value: could not determine a "
     "constructor for the tag '!bignum'"),
    ("a recursive alias", "inside_networks: &a [*a]\n",
     "p.yaml:1: inside_networks: not a plain YAML value: found unconstructable recursive "
     "node"),
    ("too many networks", "acl:\n  clients:\n    deny:\n" + "".join(
        f"      - 10.{i // 256}.{i % 256}.0/24\n" for i in range(MAX_NETWORKS + 1)),
     f"p.yaml:4: acl.clients.deny: expected at most {MAX_NETWORKS} networks, found "
     f"{MAX_NETWORKS + 1}"),
    ("a 300-character key", "k" * 300 + ": 1\n",
     "p.yaml:1: " + "k" * 60 + "... (300 characters): unknown key; expected one of: "
     "public_address, public_interface, inside_networks, queues, call_ids, limits, timeouts,"
     " acl, refuse, malformed, disconnect_rule, datapath, on_worker_down, metrics, logging"),
    ("a 10,000-character value", "public_interface: " + "e" * 10000 + "\n",
     "p.yaml:1: public_interface: expected an interface name of 1 to 15 letters, digits or "
     "_.:@+- (or null), found '" + "e" * 60 + "... (10000 characters)'"),
    ("too large", "#" * (MAX_BYTES + 1),
     f"p.yaml: not a policy: {MAX_BYTES + 1} characters, more than {MAX_BYTES}"),
]


@pytest.mark.parametrize(("text", "problem"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
def test_hostile_documents_are_one_line_problems(text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert caught.value.problems == [problem]


def test_the_depth_bound_leaves_room_for_the_layout() -> None:
    nested = "acl: {clients: {allow: [10.0.0.0/8]}}\n"  # 4 levels, as deep as the layout
    assert parse_policy(nested).policy.clients_allow == (Policy().inside_networks[0],)
    at_bound = "x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    with pytest.raises(PolicyError, match=r"x: unknown key"):  # composed, then refused
        parse_policy(at_bound)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.path)
@pytest.mark.parametrize("value", [2**63, 10**60, 10**400], ids=["2**63", "10**60", "10**400"])
def test_every_field_has_an_upper_bound(field: object, value: int) -> None:
    """A field added without an upper bound (or without a converter that refuses an
    integer) fails here: every field, whatever its kind, refuses a huge integer."""
    path = field.path  # type: ignore[attr-defined]
    *groups, leaf = path.split(".")
    text = "".join(f"{'  ' * i}{g}:\n" for i, g in enumerate(groups))
    text += f"{'  ' * len(groups)}{leaf}: {value}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    (problem,) = caught.value.problems
    assert problem.startswith(f"p.yaml:{len(groups) + 1}: {path}: expected ")


def test_many_problems_are_capped() -> None:
    text = "".join(f"k{i}: 1\n" for i in range(500))
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    problems = caught.value.problems
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1] == f"p.yaml: and {500 - MAX_PROBLEMS} more problems"


YAMLISH = st.text(alphabet="[]{}:,-&*!|>'\"#%@ \n\t9.x", max_size=200)


@settings(max_examples=300, deadline=None)
@given(st.one_of(YAMLISH, st.builds(lambda a, n, b: a + b * n, YAMLISH,
                                    st.integers(0, 3000), st.sampled_from("[{-9 "))))
def test_any_text_is_a_policy_or_a_policy_error(text: str) -> None:
    try:
        parse_policy(text, "p.yaml")
    except PolicyError as exc:
        assert exc.problems and all(p and "\n" not in p for p in exc.problems)


# -- the file --------------------------------------------------------------------------------


def read_within(path: Path, seconds: float = 10.0) -> PolicyError:
    """read_policy(path) in a thread: it must come back (a FIFO once blocked it)."""
    caught: list[BaseException] = []

    def read() -> None:
        try:
            read_policy(path)
        except BaseException as exc:  # handed to the test
            caught.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"read_policy({path}) still waiting after {seconds} s"
    (exc,) = caught
    assert isinstance(exc, PolicyError), repr(exc)
    return exc


def test_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    assert read_within(fifo).problems == [f"{fifo}: cannot read: a FIFO, not a regular file"]


def test_a_symlink_to_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    link = tmp_path / "policy.yaml"
    link.symlink_to(tmp_path / "fifo")
    assert read_within(link).problems == [f"{link}: cannot read: a FIFO, not a regular file"]


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"),
                                            ("/", "a directory")])
def test_devices_and_directories_are_refused(path: str, kind: str) -> None:
    assert read_within(Path(path)).problems == [
        f"{path}: cannot read: {kind}, not a regular file"]


def test_a_large_file_is_refused_unread(tmp_path: Path) -> None:
    sparse = tmp_path / "policy.yaml"
    with sparse.open("wb") as f:
        f.truncate(50 * 2**30)  # 50 GiB of holes: nothing is read
    assert read_within(sparse).problems == [
        f"{sparse}: cannot read: {50 * 2**30} bytes, more than {MAX_BYTES} "
        "(a policy is a few KiB)"]


def test_a_file_at_the_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("limits: {max_calls: 7}\n" + "#" * (MAX_BYTES - 24) + "\n")
    assert path.stat().st_size == MAX_BYTES
    assert read_policy(path).policy.max_calls == 7


# -- every path: check-policy, run, reload ---------------------------------------------------

FILES = {
    "deep": DEEP,
    "digits": "limits: {max_calls: " + "9" * 5000 + "}\n",
    "burst": "limits: {new_calls_burst: " + "9" * 400 + "}\n",
}


def hostile_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "policy.yaml"
    if name == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(FILES[name])
    return path


KINDS = [*FILES, "fifo"]


@pytest.mark.parametrize("name", KINDS)
def test_check_policy_rejects_without_a_traceback(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = hostile_file(tmp_path, name)
    assert cli.main(["check-policy", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    problem, summary = err.splitlines()
    assert problem.startswith(f"{path}:")
    assert summary == f"natedit: {path}: 1 problem, not a valid policy"


@pytest.mark.parametrize("name", KINDS)
def test_run_rejects_before_it_starts(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "has_capability", lambda _cap: True)
    path = hostile_file(tmp_path, name)
    assert cli.main(["run", "--policy", str(path)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"natedit: error: {path}:")


@pytest.mark.parametrize("name", KINDS)
def test_reload_keeps_the_running_policy(name: str, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("limits: {max_calls: 7}\n")
    applied: list[Policy] = []
    status = PolicyStatus()
    r = reload.Reloader(str(path), read_policy(path).policy, applied.append, status)
    path.unlink()
    hostile_file(tmp_path, name)
    assert not r.reload()
    assert applied == [] and r.running.max_calls == 7
    assert status.reloads == Counter(failed=1)
    assert status.last_error is not None and status.last_error.startswith(f"{path}:")
    assert "\n" not in status.last_error
    path.unlink()
    path.write_text("limits: {max_calls: 8}\n")
    assert r.reload() and applied[-1].max_calls == 8
