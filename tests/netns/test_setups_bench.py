"""bench/setups.py, call set-ups per second with datapath userspace and kernel side by
side, in a short run: both datapaths set up every call (each reply rewritten back to
the client's Call ID, checked by the client), the table and JSON are written, and the
run leaves no namespace behind. The figures of so short a run on a shared machine are
noisy: how fast is not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require, require_tool

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]


def test_setups_bench_short_run(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root (network namespaces)")
    require_tool("trafgen")  # bench.datapath's prerequisites, which this bench shares
    out = tmp_path / "setups.json"
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    done = subprocess.run(
        [str(REPO / "scripts" / "dev"), "setups", "--repeat", "1", "--connections", "20",
         "--calls", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "NATEDIT_VENV": sys.prefix})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| kernel | " in done.stdout and "target: kernel call set-ups" in done.stdout
    figures = json.loads(out.read_text())
    (run,) = figures["runs"]
    for path in ("natedit-userspace", "natedit-kernel"):
        assert run[path]["calls"] == 60 and run[path]["per_s"] > 0
    assert figures["summary"]["kernel_vs_userspace"] > 0
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    new = set(after.split()) - set(before.split())
    assert not [n for n in new if n.startswith("nbsu")], after
