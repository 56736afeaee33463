"""Who may import whom, read from the source (no module is run): the UI never imports
transformers or peft (it reads the store and submits jobs; the worker loads models), and
the engine never imports the session store."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_roots(path: Path) -> set[str]:
    """Top-level package names of every import in a file, inside functions too."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted((ROOT / "ui").glob("*.py")), ids=lambda p: p.name)
def test_ui_never_imports_model_libraries(path):
    assert not imported_roots(path) & {"transformers", "peft", "bitsandbytes"}


@pytest.mark.parametrize("path", sorted((ROOT / "ttrv").glob("*.py")), ids=lambda p: p.name)
def test_engine_never_imports_the_store(path):
    assert "sessions" not in imported_roots(path)
