"""The soak (bench/soak.py), CI-sized: 20 seconds of call churn with real peers.

The long run is ``sudo scripts/dev soak --minutes 10`` (the README has its figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak
from tests.harness import require_netns

pytestmark = pytest.mark.netns


def test_short_soak(tmp_path: Path) -> None:
    require_netns()
    out = tmp_path / "soak.json"
    rc = soak.main(["--minutes", "0.33", "--sample", "5", "--warm-up", "5", "--json", str(out)])
    report = json.loads(out.read_text())
    info = json.dumps({k: v for k, v in report.items() if k != "samples"})
    assert rc == 0, info
    assert all(report["checks"].values()), info
    assert report["churned_calls"] >= 15 and report["calls_max"] == 5, info
