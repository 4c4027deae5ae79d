"""The one error family for bad input from the network.

Every parse failure in the core raises :class:`ProtocolError` (never
``struct.error``, ``IndexError`` or ``ValueError``). ``reason`` is a short
snake_case code: it is the label under which the edge counts the verdict.
"""

from __future__ import annotations


class NateditError(Exception):
    """Base class of every error natedit raises on purpose."""


class ProtocolError(NateditError):
    """Bytes from the network that natedit cannot accept."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class PolicyError(NateditError):
    """A policy that cannot be used; ``problems`` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))
