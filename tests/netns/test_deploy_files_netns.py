"""deploy/rules/natedit.iptables loads: iptables-restore takes it in a namespace of
the test's own, and natedit cleanup removes it again (it owns the names)."""

from __future__ import annotations

import re
import sys

import pytest

from tests.scratch_ns import require_scratch_ns, scratch_namespaces
from tests.unit.test_deploy_files import RULES


@pytest.mark.netns
def test_iptables_file_loads_and_natedit_cleanup_removes_it() -> None:
    require_scratch_ns()
    with scratch_namespaces("rules") as (ns,):
        before = ns.iptables_save()
        ns.run(["nft", "-f", str(RULES["iptables-native"])])
        ns.run(["iptables-restore", "--noflush", str(RULES["iptables"])])
        saved = ns.iptables_save()
        # 3 networks x (TCP out, TCP in), the gateway's own client's TCP out and in, and
        # GRE out and in (claimed by the native table)
        assert len(re.findall(r"-j NFQUEUE --queue-num 172[34]", saved)) == 10, saved
        assert "set own_in" in ns.run(["nft", "list", "table", "ip", "natedit"])
        ns.run([sys.executable, "-m", "natedit", "cleanup"])
        assert ns.iptables_save() == before
        assert "natedit" not in ns.run(["nft", "list", "tables"])
