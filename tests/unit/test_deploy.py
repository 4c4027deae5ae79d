"""deploy/: Prometheus configuration and alert rules (promtool), the Grafana dashboard
and its provisioning.

The dashboard's queries are checked for syntax by promtool (as recording rules) and
for names against what natedit exports; tests/netns/test_e2e_metrics.py evaluates each of
them against a real Prometheus scraping a worker with real calls.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from natedit import dashboard as dashboard_code
from natedit.pair import Session
from tests.conftest import require_tool
from tests.unit.test_metrics import FAMILIES

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "natedit-alerts.yml"
ALERTS_TEST_YML = DEPLOY / "prometheus" / "natedit-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "natedit.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "natedit.yaml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "natedit.yaml"
DATASOURCE_UID = "natedit-prometheus"

GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}
"""Grafana's built-in variables as a query would see them (the e2e test picks its own)."""
OTHER_METRICS = {"up", "process_cpu_seconds_total", "process_resident_memory_bytes"}
PAIR_FAMILIES = {m.name + ("_total" if m.type == "counter" else "")
                 for m in Session("redis://x").collect()}
"""What a worker of a gateway pair adds (natedit.pair)."""


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def row_panels(dash: dict[str, Any], row: str) -> list[str]:
    """The titles of the panels under the row titled ``row`` (rows are laid out flat)."""
    out: list[str] = []
    current = None
    for p in dash["panels"]:
        if p["type"] == "row":
            current = p["title"]
            out.extend(q["title"] for q in p.get("panels", []) if current == row)
        elif current == row:
            out.append(p["title"])
    return out


PAIR_PANELS = frozenset(row_panels(dashboard(), dashboard_code.PAIR_ROW))
"""The pair row's panels: only a pair's workers feed them (tests/netns/test_pair.py)."""


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows (nested panels of collapsed rows included)."""
    out = []
    for p in dash["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def panel_queries(instance: str = ".*", variables: dict[str, str] | None = None
                  ) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with the dashboard's variables replaced."""
    subst = {**GRAFANA_VARIABLES, **(variables or {}), "$instance": instance}
    out = []
    for p in panels(dashboard()):
        for t in p["targets"]:
            expr = t["expr"]
            for name in sorted(subst, key=len, reverse=True):
                expr = expr.replace(name, subst[name])
            out.append((p["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS_YML.read_text())
    return [r for g in data["groups"] for r in g["rules"] if "alert" in r]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("promtool")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_config() -> None:
    res = promtool("check", "config", str(PROMETHEUS_YML))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_check_rules() -> None:
    res = promtool("check", "rules", str(ALERTS_YML))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    """Every alert fires, and only, when it should (deploy/prometheus/*.test.yml)."""
    res = promtool("test", "rules", str(ALERTS_TEST_YML))
    assert res.returncode == 0, res.stdout + res.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST_YML.read_text()))
    assert tested == {r["alert"] for r in alert_rules()}


def test_alerts_asked_for() -> None:
    assert {r["alert"] for r in alert_rules()} >= {
        "NateditCallIdPoolNearlyExhausted", "NateditDropsRising", "NateditQueueDrops",
        "NateditWorkerDown", "NateditPolicyReloadFailed"}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"], rule


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query is valid PromQL: promtool checks them as recording rules."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(panel_queries())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_names_what_natedit_exports() -> None:
    known = FAMILIES | OTHER_METRICS | PAIR_FAMILIES
    for title, expr in panel_queries():
        names = set(re.findall(r"\b((?:natedit|process)_\w+|up)\b(?=\s*[{\[(]|\s*$|\s)", expr))
        assert names, (title, expr)
        assert names <= known, (title, names - known)
    for rule in alert_rules():
        names = set(re.findall(r"\b(natedit_\w+)\b", rule["expr"]))
        assert names <= known, (rule["alert"], names - known)


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert dash["uid"] == "natedit"
    titles = [p["title"] for p in panels(dash)]
    assert len(titles) == len(set(titles)), titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID, p["title"]
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    (table,) = [p for p in panels(dash) if p["type"] == "table"]
    assert table["targets"][0]["expr"].startswith("natedit_call_info{")
    assert table["targets"][0]["format"] == "table" and table["targets"][0]["instant"]
    (var,) = dash["templating"]["list"]
    assert var["name"] == "instance" and var["datasource"]["uid"] == DATASOURCE_UID
    # what the issue asks to see at a glance
    exprs = " ".join(e for _, e in panel_queries())
    for name in ("natedit_call_info", "natedit_gre_packets_total", "natedit_call_ids_in_use",
                 "natedit_packets_dropped_total", "natedit_queue_dropped_total",
                 "natedit_calls_mapped_total"):
        assert name in exprs, name


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load(DATASOURCES.read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    providers = yaml.safe_load(PROVIDERS.read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert ds["apiVersion"] == providers["apiVersion"] == 1


def test_scrape_job_matches_the_alerts() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "natedit"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9723"]  # the policy's default
    assert config["rule_files"] == [ALERTS_YML.name]
    assert 'job="natedit"' in next(r["expr"] for r in alert_rules()
                                   if r["alert"] == "NateditWorkerDown")
