"""deploy/install.sh into a temp root: the Debian-style layout, a working natedit, idempotent.

``--root DIR`` installs below DIR and leaves the host alone (no apt, no
systemctl). The installed natedit (a venv of its own, built from a copy of
the clone) validates the installed policy and prints the rules of
deploy/rules/; the installed unit passes ``systemd-analyze verify`` with its
paths mapped into DIR. A second run changes no file, and a policy or
datasource the operator edited is never overwritten.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.unit.test_deploy_files import FLAGS, RULES, rules_body

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"
LAYOUT = {
    "usr/local/bin/natedit": None,  # a symlink, checked below
    "etc/natedit/policy.yaml": "deploy/policy.yaml",
    "etc/systemd/system/natedit.service": "deploy/systemd/natedit.service",
    "etc/prometheus/natedit-alerts.yml": "deploy/prometheus/natedit-alerts.yml",
    "etc/prometheus/prometheus.yml": "deploy/prometheus/prometheus.yml",
    "etc/grafana/provisioning/datasources/natedit.yaml":
        "deploy/grafana/provisioning/datasources/natedit.yaml",
    "etc/grafana/provisioning/dashboards/natedit.yaml":
        "deploy/grafana/provisioning/dashboards/natedit.yaml",
    "var/lib/grafana/dashboards/natedit/natedit.json": "deploy/grafana/dashboards/natedit.json",
    "opt/natedit/share/README.md": "README.md",
    "opt/natedit/share/rules/natedit.iptables": "deploy/rules/natedit.iptables",
    "opt/natedit/share/rules/natedit.nft": "deploy/rules/natedit.nft",
    "opt/natedit/share/rules/natedit-iptables.nft": "deploy/rules/natedit-iptables.nft",
    "opt/natedit/share/policy.yaml": "deploy/policy.yaml",
}


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INSTALL), "--root", str(root), "--python", sys.executable, *args],
                          capture_output=True, text=True, timeout=600)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """(mtime, sha1) of every file below ``root`` but the venv's own (its stamp included)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = (path.lstat().st_mtime_ns, str(path.readlink()))
        elif path.is_file() and ("/venv/" not in rel or rel.endswith(".natedit-source")):
            out[rel] = (path.stat().st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One install for the module (it builds a venv: seconds)."""
    path = tmp_path_factory.mktemp("root")
    done = install(path)
    assert done.returncode == 0, done.stderr
    return path


def test_layout(root: Path) -> None:
    for rel, original in LAYOUT.items():
        assert (root / rel).exists() or (root / rel).is_symlink(), rel
        if original is not None:
            assert (root / rel).read_bytes() == (REPO / original).read_bytes(), rel
    assert (root / "usr/local/bin/natedit").readlink() == Path("/opt/natedit/venv/bin/natedit")
    assert (root / "var/lib/natedit").is_dir()
    assert (root / "opt/natedit/venv/bin/natedit").is_file()


def test_installed_natedit_works(root: Path) -> None:
    natedit = root / "opt/natedit/venv/bin/natedit"
    done = subprocess.run([str(natedit), "check-policy", str(root / "etc/natedit/policy.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "valid" in done.stderr, done.stderr
    for flavour, path in RULES.items():
        done = subprocess.run([str(natedit), "rules", *FLAGS[flavour], "--policy",
                               str(root / "etc/natedit/policy.yaml"),
                               "--public-address", "198.51.100.1"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == rules_body(path), done.stderr
    # the venv is the installed copy, not the clone (which may go away)
    where = subprocess.run([str(root / "opt/natedit/venv/bin/python"), "-c",
                            "import natedit; print(natedit.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=root)
    assert where.stdout.startswith(str(root / "opt/natedit/venv/lib/")), where


def test_installed_unit_verifies(root: Path, tmp_path: Path) -> None:
    exe = require_tool("systemd-analyze")
    unit = (root / "etc/systemd/system/natedit.service").read_text()
    mapped = tmp_path / "natedit.service"
    mapped.write_text(unit.replace("/usr/local/bin/natedit",
                                   str(root / "opt/natedit/venv/bin/natedit")))
    done = subprocess.run([exe, "verify", str(mapped)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr


def test_second_run_changes_nothing_and_keeps_edits(root: Path) -> None:
    policy = root / "etc/natedit/policy.yaml"
    datasource = root / "etc/grafana/provisioning/datasources/natedit.yaml"
    policy.write_text("limits:\n  max_calls: 100\n")
    datasource.write_text(datasource.read_text().replace("127.0.0.1:9090", "prom:9090"))
    before = snapshot(root)
    done = install(root)
    assert done.returncode == 0, done.stderr
    assert snapshot(root) == before
    assert "installed" not in done.stderr, done.stderr
    assert "[install] kept /etc/natedit/policy.yaml (yours; the original is " \
           "/opt/natedit/share/policy.yaml)" in done.stderr
    assert "kept /etc/grafana/provisioning/datasources/natedit.yaml" in done.stderr
    assert "unchanged /opt/natedit/venv (natedit 0.1.0)" in done.stderr


def test_bad_options(tmp_path: Path) -> None:
    done = install(tmp_path, "--prefix", "relative/dir")
    assert done.returncode == 1 and "--prefix must be absolute" in done.stderr
    done = install(tmp_path, "--enable")
    assert done.returncode == 1 and "--enable and --root do not mix" in done.stderr
    assert list(tmp_path.iterdir()) == []
    done = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "sudo deploy/install.sh" in done.stdout
