"""Shared test plumbing. Keep it small: helpers live in modules of their own."""

from __future__ import annotations

import os
import shutil

import pytest


def require(condition: bool, why: str) -> None:
    """Skip when a prerequisite is missing; under CI=true a missing one is a failure."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"prerequisite missing under CI: {why}")
    pytest.skip(why)


def require_tool(name: str) -> str:
    """The path of command ``name`` (see :func:`require`)."""
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path
