"""deploy/rules/: exactly what ``natedit rules`` prints for the example policy, never stale.

Each file is a header of comments (how it was made, how to adapt it) and
then, byte for byte, the output of the command its header names. The
iptables file also loads (tests/netns/test_deploy_files_netns.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES = {
    "iptables": REPO / "deploy" / "rules" / "natedit.iptables",
    "iptables-native": REPO / "deploy" / "rules" / "natedit-iptables.nft",
    "nft": REPO / "deploy" / "rules" / "natedit.nft",
}
FLAGS = {
    "iptables": ["--flavour", "iptables"],
    "iptables-native": ["--flavour", "iptables", "--native"],
    "nft": ["--flavour", "nft"],
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
    assert argv == ["natedit", "rules", *FLAGS[flavour], "--policy", "deploy/policy.yaml",
                    "--public-address", EXAMPLE_ADDRESS]
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert body == done.stdout, f"{path} is stale: run the command in its header"
    assert "Adapt before use" in "\n".join(header) and EXAMPLE_ADDRESS in "\n".join(header)
