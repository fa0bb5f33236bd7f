"""Import direction from DESIGN.md: a module may import the ones below it, never the ones above."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "clipkit"
# lower index = lower layer; modules in the same tuple may not import each other either way... except as listed
LAYERS = [
    ("errors", "fileio"),
    ("config",),
    ("transforms", "tokenizer"),
    ("towers",),
    ("model",),
    ("factory", "convert", "losses"),
    ("checkpoint",),
    ("embed", "data", "cache", "datasets"),
    ("indexio",),
    ("evaluate", "fewshot", "plots", "scoring", "search", "collection", "tasks", "report"),
    ("runstate", "train"),
    ("service", "demo"),
    ("cli",),
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            mod = (node.module or "").split(".")[0]
            names = [mod] if mod else [a.name for a in node.names]
            found.update(n for n in names if n in RANK)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipkit."):
            found.add(node.module.split(".")[1])
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    rel = path.relative_to(PKG)
    name = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    assert name in RANK, f"{rel}: add this module to LAYERS in tests/test_layering.py (and the README)"
    upward = [m for m in _imports(path) if RANK[m] > RANK[name]]
    assert not upward, f"{rel} imports higher layers {upward}"
