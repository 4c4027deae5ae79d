"""The layout holds: the core imports nothing but itself and pure standard modules,
the edges reach the core only through ``natedit``'s public names, and no class grows
past about 300 lines (ARCHITECTURE.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "natedit"
CORE = PACKAGE / "core"

STDLIB_FOR_CORE = frozenset({
    "__future__", "array", "bisect", "collections", "dataclasses", "enum", "heapq", "ipaddress",
    "random", "struct", "typing",
})
"""Pure modules only: no clock (time), no sockets, threads, processes, files (os, io,
pathlib), no YAML, nothing from the edges."""
MAX_CLASS_LINES = 310
"""About 300: a class that outgrows it holds more than one concern."""
EDGE_CORE_IMPORTS = {"policyfile.py"}
"""Edges that may import natedit.core directly: the policy loader, which natedit's
own ``__init__`` imports (the public names are not all bound yet when it runs)."""


def imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
    return out


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_only_itself_and_pure_stdlib(path: Path) -> None:
    bad = []
    for line, module, level in imports(path):
        if level == 1:
            continue  # natedit.core itself
        top = module.split(".")[0]
        if level > 1 or (top not in STDLIB_FOR_CORE and not module.startswith("natedit.core")):
            bad.append(f"{path.name}:{line}: {'.' * level}{module}")
    assert not bad, bad


def test_the_import_walker_catches_what_it_must(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import time\nfrom os import path\nfrom ..metrics import X\n"
                      "from .wire import Y\nimport yaml, socket\n")
    found = [(m, lvl) for _, m, lvl in imports(sample)]
    assert found == [("time", 0), ("os", 0), ("metrics", 2), ("wire", 1), ("yaml", 0),
                     ("socket", 0)]
    assert not {"time", "os", "yaml", "socket", "threading", "io", "pathlib"} & STDLIB_FOR_CORE


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py")
                                        if CORE not in p.parents and p.name != "__init__.py"
                                        and p.name not in EDGE_CORE_IMPORTS),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_edges_use_the_public_names(path: Path) -> None:
    bad = [f"{path.name}:{line}: {'.' * level}{module}" for line, module, level in imports(path)
           if module.startswith("natedit.core") or (level >= 1 and module.split(".")[0] == "core"
                                                     and CORE.parent == path.parent)
           or (level == 2 and module.startswith("core"))]
    assert not bad, bad


def test_no_class_over_300_lines() -> None:
    big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    big.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n}")
    assert not big, big
