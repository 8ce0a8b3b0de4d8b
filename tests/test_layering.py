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
