"""What the worker knows about itself beyond the call table, for metrics and logs.

The call table stays the single source of truth of calls; this holds the
worker's own facts: which policy is in force, how reloads went.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PolicyStatus:
    source: str | None = None
    """Path of the policy file in force; None for the built-in default."""
    loaded_at: float = 0.0
    """Wall-clock time (seconds since the epoch) the policy in force was loaded."""
    reloads: Counter[str] = field(default_factory=Counter)
    """Reload attempts by outcome: ``ok``, ``failed``."""
    last_error: str | None = None
    """The problems of the last rejected reload, one per line; None again once a
    reload succeeds (so: not None = the file on disk is not the policy in force)."""
