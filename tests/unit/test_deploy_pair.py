"""deploy/keepalived and deploy/conntrackd: the files of a gateway pair (the namespace
test tests/netns/test_pair.py runs the notify script itself, with configurations of
the same shape)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KEEPALIVED = DEPLOY / "keepalived" / "keepalived.conf"
NOTIFY = DEPLOY / "keepalived" / "natedit-notify.sh"
CONNTRACKD = DEPLOY / "conntrackd" / "conntrackd.conf"


def test_notify_script_is_valid_sh_and_executable() -> None:
    res = subprocess.run(["sh", "-n", str(NOTIFY)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert NOTIFY.stat().st_mode & 0o111
    text = NOTIFY.read_text()
    for step in ("REPLICAOF NO ONE", "promote", "demote", "nft", "-c"):
        assert step in text, step


def test_keepalived_example_syncs_both_addresses_and_notifies() -> None:
    text = KEEPALIVED.read_text()
    group = re.search(r"vrrp_sync_group \w+ \{(.*?)\n\}", text, re.S)
    assert group is not None
    instances = set(re.findall(r"vrrp_instance (\w+)", text))
    assert instances == {"inside", "outside"}
    assert all(name in group.group(1) for name in instances)
    assert "natedit-notify.sh" in group.group(1)
    assert len(re.findall(r"^\s+advert_int 1\s*$", text, re.M)) == 2
    assert len(re.findall(r"^\s+nopreempt\s*$", text, re.M)) == 2


def test_conntrackd_example_is_ftfw_on_a_dedicated_link() -> None:
    text = CONNTRACKD.read_text()
    assert "Mode FTFW" in text and "Interface sync0" in text
    assert re.search(r"Protocol Accept \{\s*TCP\s*\}", text)
