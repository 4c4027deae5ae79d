"""Human views of the call table (replay summary, CLI listings)."""

from __future__ import annotations

from collections.abc import Sequence

from . import CallInfo
from .logs import call_id

HEADER = ("CLIENT", "CLIENT-ID", "SERVER", "SERVER-ID", "PUBLIC", "PUBLIC-ID", "STATE")


def format_calls(calls: Sequence[CallInfo]) -> str:
    """A ``conntrack -L``-like table, one call per row, columns aligned, Call IDs in hex."""
    rows = [HEADER]
    for c in calls:
        rows.append((str(c.client_address), call_id(c.client_call_id), str(c.server_address),
                     call_id(c.server_call_id), str(c.public_address), call_id(c.public_call_id),
                     c.state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
