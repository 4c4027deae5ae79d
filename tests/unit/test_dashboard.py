"""The committed Grafana dashboard is what natedit/dashboard.py builds.

deploy/grafana/dashboards/natedit.json is generated (``scripts/dev dashboard``);
this test fails when the file and the code disagree, so neither is edited alone.
tests/unit/test_deploy.py checks the queries' syntax and names, tests/netns/test_e2e_metrics.py
that each returns data from a real Prometheus.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from natedit import dashboard
from tests.netns.test_dev_script import DEV, VENV
from tests.unit.test_deploy import DASHBOARD, panels


def test_committed_dashboard_is_what_the_code_builds() -> None:
    assert DASHBOARD == dashboard.OUTPUT
    assert DASHBOARD.read_text() == dashboard.render(), (
        "deploy/grafana/dashboards/natedit.json is stale: run scripts/dev dashboard")


def test_every_row_lays_out_on_the_grid() -> None:
    """Panels fill rows left to right without overlapping, inside the 24-column grid."""
    built = json.loads(dashboard.render())
    taken: set[tuple[int, int]] = set()
    for p in built["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, p["title"]
        taken |= cells
    rows = [p["title"] for p in built["panels"] if p["type"] == "row"]
    assert rows == list(dashboard.ROWS)
    assert len(panels(built)) == len(built["panels"]) - len(rows)


def test_main_prints_the_dashboard(capsys: pytest.CaptureFixture[str]) -> None:
    assert dashboard.main([]) == 0
    assert capsys.readouterr().out == dashboard.render()


def test_dev_dashboard_writes_the_file(tmp_path: Path) -> None:
    """``scripts/dev dashboard``, as the README says, here into a scratch file."""
    out = tmp_path / "natedit.json"
    done = subprocess.run([str(DEV), "dashboard", "--output", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **VENV})
    assert done.returncode == 0, done.stderr
    assert out.read_text() == DASHBOARD.read_text()
