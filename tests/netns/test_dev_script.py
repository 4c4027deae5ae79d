"""scripts/dev, the README's entry point: help, run (in a namespace of our own), bench.

``scripts/dev test`` is what CI runs (.ci/run), so the suite itself is its test.
``scripts/dev run`` is started inside a network namespace with a default route
(so the built-in policy finds its public address there), waits for
``natedit: ready``, gets SIGTERM and must exit 0 with the namespace's ruleset
as before. It uses the venv the tests run in (NATEDIT_VENV; scripts/dev only
reinstalls when that venv lacks a stamp for this pyproject.toml), and
``--pid-file '' --state ''`` so that nothing is written to the host's
/run/natedit or /var/lib/natedit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.scratch_ns import LONE_GATEWAY, Namespace, require_scratch_ns, scratch_namespaces

REPO = Path(__file__).resolve().parents[2]
DEV = REPO / "scripts" / "dev"
VENV = {"NATEDIT_VENV": sys.prefix}


def dev(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEV), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **VENV})


def test_help_lists_the_commands() -> None:
    done = dev("help")
    assert done.returncode == 0
    for line in ("sudo scripts/dev run [natedit run options]",
                 "sudo scripts/dev test [pytest options]", "scripts/dev bench"):
        assert line in done.stdout, done.stdout
    assert dev().stdout == done.stdout  # no command: the same help
    wrong = dev("no-such-command")
    assert wrong.returncode == 2 and wrong.stdout == done.stdout


def test_bench_prints_progress_per_figure() -> None:
    require(os.geteuid() == 0, "scripts/dev checks the runtime Debian packages as root")
    done = dev("bench", "--seconds", "0.05", "--setups", "500")
    assert done.returncode == 0, done.stderr
    progress = [ln for ln in done.stderr.splitlines() if ln.startswith("[bench] ")]
    assert len(progress) == 6, done.stderr
    assert progress[0].startswith("[bench] 1/6 gre_in_64B_pps ... ")
    assert all(ln.endswith(" s)") and "/s (" in ln for ln in progress), progress
    assert done.stdout.splitlines()[0].split() == ["figure", "per", "second"]
    assert "target call_setups_per_s >= 25,000" in done.stdout  # issue 15's target


@pytest.fixture
def gateway() -> Iterator[Namespace]:
    require_scratch_ns()
    with scratch_namespaces(topology=LONE_GATEWAY) as (gw,):
        yield gw


@pytest.mark.netns
def test_dev_run_serves_until_sigterm_and_leaves_the_ruleset_clean(gateway: Namespace) -> None:
    before = gateway.iptables_save()
    proc = subprocess.Popen(gateway.argv([str(DEV), "run", "--pid-file", "", "--state", ""]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **VENV})
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("natedit: ready "):
                break
        ready = [ln for ln in lines if ln.startswith("natedit: ready ")]
        assert ready, "".join(lines)
        assert "public_address=198.51.100.1" in ready[0]  # the built-in policy's choice
        assert "NATEDIT-FORWARD" in gateway.iptables_save()
        assert not any(ln.startswith("[dev] creating") for ln in lines), lines  # no new venv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "natedit: stopped; rules removed" in output
    assert gateway.iptables_save() == before
