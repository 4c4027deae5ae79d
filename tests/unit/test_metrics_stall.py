"""/calls is encoded in pieces (issue 11, item 6): one ``json.dumps`` of the whole table
held the GIL, so the packet path, for 239 ms at 64,000 calls; now no piece encodes more
than CALLS_CHUNK calls and the packet path runs between two. The stall itself is
measured by ``python -m bench.metrics --calls 65535`` (one-shot and pieces side by side).
"""

from __future__ import annotations

import json

import pytest

from natedit import metrics


def rows(n: int) -> list[dict[str, object]]:
    return [{"public_call_id": i, "client_address": "10.0.0.1", "state": "established"}
            for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, metrics.CALLS_CHUNK, metrics.CALLS_CHUNK + 1, 3000])
def test_the_body_is_the_same_json_in_pieces(n: int) -> None:
    calls = rows(n)
    chunks = [calls[i:i + metrics.CALLS_CHUNK] for i in range(0, n, metrics.CALLS_CHUNK)]
    pieces = list(metrics.calls_body(chunks))
    assert json.loads(b"".join(pieces)) == {"calls": calls}
    assert len(pieces) == 2 + -(-n // metrics.CALLS_CHUNK)
    one_call = max((len(json.dumps(c)) for c in calls), default=0) + 2  # and ", "
    assert max(len(p) for p in pieces) <= metrics.CALLS_CHUNK * one_call + 2
