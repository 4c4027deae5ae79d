"""The state file on a disk that cannot be written: full (ENOSPC), read-only (EROFS).

Needs root: each case runs in a mount namespace of its own (``unshare
--mount``) on a small tmpfs that the namespace's end removes. A state file
that SQLite reads fine but cannot write beside (its ``-wal`` and ``-shm``
cannot be made) is left exactly as it is: its calls are restored and kept in
memory, ``state_error`` is counted, and the next start, once the disk has
room again, restores the same calls from the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import require, require_tool

SCRIPT = textwrap.dedent('''
    import json, os, subprocess, sys
    from collections import Counter
    from natedit.state import StateStore, restore_into
    from tests.pptp_flows import Conversation, establish, make_translator

    mnt, case = sys.argv[1], sys.argv[2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "natedit-test", mnt],
                   check=True)
    path = os.path.join(mnt, "state", "state.db")
    old = make_translator()
    conv = Conversation(old, "10.0.0.5")
    conv.open()
    for i in range(5):
        establish(conv, 0x1200 + i, 0x80 + i)
    store, _ = StateStore.open(path, identity="id")
    store.replace_all(old.snapshot(), 1.0)
    store.close()  # checkpointed: only state.db and state.db.lock are left
    before = sorted(os.listdir(os.path.dirname(path)))
    filler = os.path.join(mnt, "filler")
    if case == "full":
        try:
            with open(filler, "wb") as f:
                while True:
                    f.write(bytes(4096))
                    f.flush()
        except OSError:
            pass
    else:
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    counts = Counter()
    new = make_translator()
    journal = restore_into(new, path, counts, identity="id")
    first = {"journal": journal is not None, "counts": dict(counts), "calls": len(new.calls()),
             "files": sorted(f for f in os.listdir(os.path.dirname(path))
                             if not f.endswith(("-wal", "-shm")))}
    if case == "full":
        os.unlink(filler)
    else:
        subprocess.run(["mount", "-o", "remount,rw", mnt], check=True)
    counts = Counter()
    later = make_translator()
    journal = restore_into(later, path, counts, identity="id")
    second = {"journal": journal is not None, "counts": dict(counts),
              "calls": len(later.calls())}
    if journal is not None:
        journal.close()
    print(json.dumps({"before": before, "first": first, "second": second}))
''')


@pytest.mark.parametrize("case", ["full", "read_only"])
def test_an_unwritable_disk_never_loses_the_calls(tmp_path: Path, case: str) -> None:
    require(os.geteuid() == 0, "needs root (a mount namespace and a tmpfs)")
    unshare = require_tool("unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c", SCRIPT,
         str(mnt), case],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["before"] == ["state.db", "state.db.lock"]
    assert result["first"] == {"journal": False, "counts": {"state_error": 1}, "calls": 5,
                               "files": ["state.db", "state.db.lock"]}  # nothing moved aside
    assert result["second"] == {"journal": True, "counts": {}, "calls": 5}
    assert not any(mnt.iterdir())  # the tmpfs went with its namespace
