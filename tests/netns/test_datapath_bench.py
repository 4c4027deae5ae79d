"""bench/datapath.py, the README's datapath table, in a short run: it builds its
namespaces, measures, prints the table, writes its JSON and removes everything.

The figures of so short a run on a shared 2-core machine are noisy; what is checked
is that every path carried correctly translated GRE both ways and that the run
leaves nothing behind, not how fast.
"""

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


def test_datapath_bench_short_run(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root (network namespaces)")
    require_tool("trafgen")
    out = tmp_path / "datapath.json"
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    done = subprocess.run(
        [str(REPO / "scripts" / "dev"), "datapath", "--repeat", "1", "--seconds", "0.3",
         "--probes", "40", "--paths", "plain,natedit-userspace,natedit-kernel", "--json",
         str(out)],
        capture_output=True, text=True, timeout=240, env={**os.environ,
                                                          "NATEDIT_VENV": sys.prefix})
    assert done.returncode == 0, done.stderr[-3000:]
    progress = [ln for ln in done.stderr.splitlines() if ln.startswith("[datapath] run 1/1 ")]
    assert len(progress) == 3, done.stderr
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith("| natedit-")]
    assert len(rows) == 2, done.stdout
    figures = json.loads(out.read_text())
    for path in ("plain", "natedit-userspace", "natedit-kernel"):
        for key in ("out_64", "in_64", "out_1400", "in_1400"):
            assert figures["runs"][0][path][key]["pps"] > 1000, (path, key, figures["runs"])
        assert figures["runs"][0][path]["latency_in"]["received"] >= 36
    assert figures["summary"]["natedit-kernel"]["in_64_vs_plain"] > 0
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    new = set(after.split()) - set(before.split())
    assert not [n for n in new if n.startswith("nb")], after
