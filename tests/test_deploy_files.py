"""deploy/rules/: exactly what ``natedit rules`` prints for the example policy, never stale.

Each file is a header of comments (how it was made, how to adapt it) and
then, byte for byte, the output of the command its header names. The
iptables file also loads: iptables-restore takes it in a namespace of the
test's own, and natedit cleanup removes it again (it owns the names).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scratch_ns import require_scratch_ns, scratch_namespaces

REPO = Path(__file__).resolve().parent.parent
RULES = {
    "iptables": REPO / "deploy" / "rules" / "natedit.iptables",
    "nft": REPO / "deploy" / "rules" / "natedit.nft",
}
EXAMPLE_ADDRESS = "198.51.100.1"


def header_and_body(path: Path) -> tuple[list[str], str]:
    """The leading comment block (up to its first empty ``#`` line after "Made by") and the
    rest."""
    lines = path.read_text().splitlines(keepends=True)
    end = max(i for i, line in enumerate(lines) if line.startswith("# Adapt before use"))
    while lines[end].strip() != "#":
        end += 1
    return [ln.rstrip("\n") for ln in lines[:end + 1]], "".join(lines[end + 1:])


def rules_body(path: Path) -> str:
    return header_and_body(path)[1]


def made_by(path: Path) -> list[str]:
    header, _ = header_and_body(path)
    (command,) = [h for h in header if h.startswith("#   natedit rules ")]
    return command.removeprefix("#   ").split()


@pytest.mark.parametrize("flavour", list(RULES))
def test_rules_files_are_what_natedit_rules_prints(flavour: str) -> None:
    path = RULES[flavour]
    header, body = header_and_body(path)
    assert all(line.startswith("#") for line in header)
    argv = made_by(path)
    assert argv == ["natedit", "rules", "--flavour", flavour, "--policy", "deploy/policy.yaml",
                    "--public-address", EXAMPLE_ADDRESS]
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert body == done.stdout, f"{path} is stale: run the command in its header"
    assert "Adapt before use" in "\n".join(header) and EXAMPLE_ADDRESS in "\n".join(header)


@pytest.mark.netns
def test_iptables_file_loads_and_natedit_cleanup_removes_it() -> None:
    require_scratch_ns()
    with scratch_namespaces("rules") as (ns,):
        before = ns.iptables_save()
        ns.run(["iptables-restore", "--noflush", str(RULES["iptables"])])
        saved = ns.iptables_save()
        # 3 networks x (TCP out, GRE out, TCP in), and GRE in
        assert len(re.findall(r"-j NFQUEUE --queue-num 172[34]", saved)) == 10, saved
        ns.run([sys.executable, "-m", "natedit", "cleanup"])
        assert ns.iptables_save() == before
