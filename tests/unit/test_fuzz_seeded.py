"""The seeded fuzzer (bench/fuzz.py), CI-sized: 20,000 mutated inputs from a real capture.

The long run is ``python -m bench.fuzz --inputs 1000000`` (atheris when installed).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import fuzz
from natedit.core.wire import parse_control_header


def test_seed_capture_holds_a_whole_conversation() -> None:
    seeds, records = fuzz.load_seeds(fuzz.SEED_PCAP)
    types = {parse_control_header(m).message_type.name for m in seeds["control"]}
    assert types >= {"START_CONTROL_CONNECTION_REQUEST", "START_CONTROL_CONNECTION_REPLY",
                     "OUTGOING_CALL_REQUEST", "OUTGOING_CALL_REPLY", "CALL_CLEAR_REQUEST",
                     "CALL_DISCONNECT_NOTIFY", "STOP_CONTROL_CONNECTION_REQUEST"}
    assert len(records) == 2 and {r.client_call_id for r in records} == {0x1234}
    assert all(seeds[t] for t in fuzz.TARGETS)


def test_seeds_pass_unmutated() -> None:
    seeds, records = fuzz.load_seeds(fuzz.SEED_PCAP)
    f = fuzz.Fuzzer(records)
    for i, target in enumerate(fuzz.TARGETS):
        for s in seeds[target]:
            f.one(bytes([i]) + s)
    assert f.reasons["rewritten"] > 0  # the live calls' GRE is translated


def test_short_random_fuzz_run(tmp_path: Path) -> None:
    out = tmp_path / "counts.json"
    rc = fuzz.main(["--inputs", "20000", "--engine", "random", "--json", str(out),
                    "--crash-dir", str(tmp_path / "crashes")])
    counts = json.loads(out.read_text())
    assert rc == 0 and counts["inputs"] == 20000 and counts["failures"] == 0, counts
    assert set(counts["by_target"]) == set(fuzz.TARGETS)
    assert not (tmp_path / "crashes").exists()
