"""The package boundaries of DESIGN.md: ops knows nothing of Prefect, Ray or Zarr; storage
knows nothing of models; the viewer reads the atlas through storage only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "ops": {"prefect", "ray", "zarr", "dask", "flows", "storage", "viewer"},
    "storage": {"torch", "transformers", "prefect", "ray", "ops", "flows", "viewer"},
    "viewer": {"torch", "transformers", "prefect", "ray", "ops", "flows"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package])
           for f in files}  # fmt: skip
    assert {f: b for f, b in bad.items() if b} == {}


def _module_imports(path: Path) -> set[str]:
    """Project modules imported at module level (imports inside functions are deliberate
    late imports and cannot form a cycle at import time)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If | ast.Try):  # TYPE_CHECKING blocks count too
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return found


def test_no_import_cycles() -> None:
    """No module of ops/, storage/, flows/ or viewer/ imports itself back, even for typing."""
    mods = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
            for pkg in ("ops", "storage", "flows", "viewer") for f in (ROOT / pkg).rglob("*.py")}  # fmt: skip
    graph = {m: {i for i in _module_imports(f) if i in mods and i != m} for m, f in mods.items()}
    for m in graph:  # a package's __init__ re-exports; an import of it is not an edge back
        graph[m] -= {p for p in ("ops", "storage", "flows", "viewer") if p != m}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = {m: c for m in sorted(graph) if (c := cycle_from(m))}
    assert cycles == {}
