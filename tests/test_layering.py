"""Import direction: a package imports only the packages below it, and inside a package a module imports
only the modules below it. The layers are the README's architecture section."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "clipkit"
# lower index = lower layer; names in one tuple are peers and must not import each other
PACKAGES = [("errors",), ("fileio",), ("model",), ("formats", "data"), ("embed",), ("report",),
            ("evaluate", "search"), ("train",), ("app",), ("cli",)]
MODULES = {  # inside each subpackage, the same rule over its modules
    "model": [("packaged",), ("config", "precision"), ("transforms", "tokenizer", "hubfiles"), ("towers", "groups"), ("clip",), ("factory",)],
    "formats": [("weights", "layout"), ("native", "hf", "openclip"), ("hub",), ("auto",), ("pretrained",)],
    "data": [("tables", "augment"), ("samples",), ("shards", "cache", "datasets"), ("stream", "shard_writer")],
    "evaluate": [("fewshot", "zeroshot"), ("metrics", "tasks"), ("scoring",), ("runners",)],
    "search": [("io", "exact", "filters"), ("build", "query"), ("index",), ("dedup",), ("collection",)],
    "report": [("page", "plots")],
    "train": [("config", "losses", "runlog"), ("runstate", "streamdata"), ("setup",), ("validation",), ("trainer",),
              ("distill",)],
    "app": [("guard", "connections", "files"), ("uploads", "fetch"), ("clipretrieval",), ("demo", "service")],
    "cli": [("common",), ("data", "train", "evaluate", "embed", "models", "search")],
}


def _rank(layers: list[tuple[str, ...]]) -> dict[str, int]:
    return {name: i for i, layer in enumerate(layers) for name in layer}


TOP = _rank(PACKAGES)


def _imports(path: Path) -> set[tuple[str, ...]]:
    """Every clipkit module `path` imports, as a tuple of names below `clipkit` (e.g. ("model", "config"))."""
    here = path.relative_to(PKG).with_suffix("").parts
    package = here[:-1] if path.name != "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = (*base, *(node.module or "").split(".")) if node.module else base
            names = [(*target, a.name) for a in node.names] if not node.module else [target]
            found.update(tuple(n for n in name if n) for name in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipkit."):
            found.add(tuple(node.module.split(".")[1:]))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p != PKG / "__init__.py")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    rel = path.relative_to(PKG).with_suffix("").parts
    top = rel[0]
    assert top in TOP, f"{'/'.join(rel)}: add {top!r} to PACKAGES in tests/test_layering.py (and the README)"
    for target in _imports(path):
        assert TOP[target[0]] <= TOP[top], f"{'/'.join(rel)} imports a higher layer: {'.'.join(target)}"
        if TOP[target[0]] == TOP[top] and target[0] != top:
            pytest.fail(f"{'/'.join(rel)} imports its peer {target[0]!r}")
        if target[0] == top and len(rel) > 1 and rel[-1] != "__init__" and len(target) > 1:
            inner = _rank(MODULES[top])
            mine, theirs = rel[1], target[1]
            assert mine in inner and theirs in inner, f"add {top}/{mine} and {top}/{theirs} to MODULES"
            assert inner[theirs] < inner[mine] or (mine == theirs), \
                f"{'/'.join(rel)} imports {'.'.join(target)}, which is not below it"
