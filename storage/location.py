"""Where an atlas lives: a local directory or an fsspec URL (``s3://``, ``gs://``,
``memory://``, ``file://``), behind one small interface.

Everything that asks about the atlas as a whole goes through here: does it exist, is the
place empty (a prefix holding other objects is refused like a non-empty directory), remove
it, and small side files (checkpoints stay local, see :func:`scratch_dir`). Zarr reads and
writes go through the store of :func:`storage.integrity.base_store`, built from the same URL.

Credentials and endpoints come from the environment, as fsspec and boto read them
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...); flows pass
those variables on to Ray workers (:data:`STORAGE_ENV`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import fsspec

from storage.errors import AtlasError

STORAGE_ENV = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "FSSPEC_", "S3_")
"""Prefixes of environment variables that configure object-store access; a run hands them
to its Ray workers so that every process reaches the atlas the driver reaches."""


def is_url(path: str | Path) -> bool:
    """An object-store URL (``file://`` URLs count as local paths)."""
    p = str(path)
    return "://" in p and not p.startswith("file://")


def local(path: str | Path) -> Path:
    return Path(str(path).removeprefix("file://"))


def shown(path: str | Path) -> str:
    """The atlas location as a user should type it again: URLs intact, local paths
    absolute."""
    return str(path) if is_url(path) else os.path.abspath(local(path))


def storage_env() -> dict[str, str]:
    """The object-store settings of this process's environment (:data:`STORAGE_ENV`)."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV)}


def _fs(path: str | Path) -> tuple[Any, str]:
    try:
        fs, root = fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise AtlasError(f"cannot reach atlas location {path}: {e}") from None
    return fs, root.rstrip("/")


def exists(path: str | Path) -> bool:
    """Whether an atlas (its root ``zarr.json``) is at ``path``."""
    if not is_url(path):
        return (local(path) / "zarr.json").is_file()
    fs, root = _fs(path)
    return bool(fs.exists(f"{root}/zarr.json"))


def occupied(path: str | Path) -> bool:
    """Whether anything at all is at ``path`` (a file, or a directory/prefix with entries)."""
    if not is_url(path):
        p = local(path)
        return p.exists() and (not p.is_dir() or any(p.iterdir()))
    fs, root = _fs(path)
    try:
        return bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return False


def remove(path: str | Path) -> None:
    """Delete the atlas at ``path`` and everything under it."""
    if not is_url(path):
        import shutil

        shutil.rmtree(local(path))
        return
    fs, root = _fs(path)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.invalidate_cache()


def scratch_dir(path: str | Path) -> Path:
    """A local directory for one atlas's working files that are not Zarr (training
    checkpoints): under the atlas for a local atlas, under ``$NEURONMAP_SCRATCH`` (default
    ``~/.cache/neuronmap``) keyed by the URL for an object-store atlas."""
    if not is_url(path):
        return local(path) / "_work"
    base = Path(os.environ.get("NEURONMAP_SCRATCH", Path.home() / ".cache" / "neuronmap"))
    return base / "work" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
