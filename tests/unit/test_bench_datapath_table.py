"""bench/datapath.py's table and targets from figures made up here: the latency column is
the added latency when plain forwarding was measured, and the raw one-way latency,
marked so, when it was not (it used to print "+0 us"); the latency targets."""

from __future__ import annotations

from typing import Any

from bench import datapath

KEYS = [f"{d}_{s}" for s in datapath.SIZES for d in datapath.DIRECTIONS]


def figures(pps: float, latency_us: float) -> dict[str, Any]:
    out: dict[str, Any] = {k: {"pps": pps} for k in KEYS}
    for d in datapath.DIRECTIONS:
        out[f"latency_{d}"] = {"median_us": latency_us, "p99_us": latency_us * 2,
                               "received": 100}
    return out


def test_without_plain_the_latency_is_raw_and_its_target_not_applicable() -> None:
    paths = ["nfq-accept", "natedit-userspace"]
    reps = [{"nfq-accept": figures(200_000, 40), "natedit-userspace": figures(170_000, 55)}]
    text = datapath.table(datapath.summarize(reps, paths), paths)
    assert "+0 " not in text
    assert "| natedit-userspace | 170 k (0.85) | " in text
    assert "55 (110) us raw / 55 (110) us raw" in text
    assert "0.8x a bare accept-only NetfilterQueue worker: out 64 B 0.85" in text
    assert "1.5x the accept-only worker's: n/a (needs plain in --paths)" in text


def test_with_plain_the_added_latency_and_its_target() -> None:
    paths = ["plain", "nfq-accept", "natedit-userspace"]
    reps = [{"plain": figures(400_000, 20), "nfq-accept": figures(200_000, 45),
             "natedit-userspace": figures(170_000, 80)}] * 3
    summary = datapath.summarize(reps, paths)
    text = datapath.table(summary, paths)
    (row,) = [ln for ln in text.splitlines() if ln.startswith("| natedit-userspace ")]
    assert row.startswith("| natedit-userspace | 170 k (0.42 / 0.85) | ")
    assert row.endswith(" | +60 (+120) us / +60 (+120) us |")
    (_, latency) = datapath.targets(summary, paths)
    assert latency["latency"] == {"out": (60, 25), "in": (60, 25)} and latency["met"] is False
    assert "out +60 vs +25 us (2.40x)" in text and "MISSED" in text
    faster = [{**reps[0], "natedit-userspace": figures(170_000, 55)}]
    assert datapath.targets(datapath.summarize(faster, paths), paths)[1]["met"] is True


def test_before_paths_get_the_ratio_to_them() -> None:
    """``--before DIR``: each natedit-* path is set beside its -before (another source
    tree's natedit), the median of the per-run ratios."""
    paths = ["nfq-accept", "natedit-userspace", "natedit-userspace-before"]
    reps = [{"nfq-accept": figures(200_000, 40), "natedit-userspace": figures(90_000, 55),
             "natedit-userspace-before": figures(100_000, 50)},
            {"nfq-accept": figures(200_000, 40), "natedit-userspace": figures(110_000, 55),
             "natedit-userspace-before": figures(100_000, 50)}]
    summary = datapath.summarize(reps, paths)
    assert summary["natedit-userspace"]["out_64_vs_before"] == 1.0  # median of 0.9, 1.1
    assert "out_64_vs_before" not in summary["nfq-accept"]
    text = datapath.table(summary, paths)
    assert ("natedit-userspace / natedit-userspace-before (medians of the per-run ratios): "
            "out 64 B 1.00, in 64 B 1.00, out 1400 B 1.00, in 1400 B 1.00") in text
