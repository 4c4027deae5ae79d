"""The one prerequisite gate of the real-peer tests."""

from __future__ import annotations

from natedit.lab import topology
from tests.conftest import require

TEST_COMMANDS = ("tcpdump", "tshark", "conntrack")
"""What the tests run on top of the lab: captures, a second decoder, conntrack listings."""


def prerequisite_problems() -> list[str]:
    """What is missing for the real-peer tests on this machine (empty list: all good)."""
    return topology.prerequisite_problems(TEST_COMMANDS)


def require_netns() -> None:
    """The one prerequisite gate for every real-peer test.

    Missing prerequisites fail the test when ``CI=true`` (a CI runner that cannot run these
    tests is misconfigured) and skip it everywhere else.
    """
    problems = prerequisite_problems()
    require(not problems, "real-peer PPTP lab unavailable: " + "; ".join(problems))
