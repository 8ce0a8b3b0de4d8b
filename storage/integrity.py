"""Integrity of an atlas: every chunk checksummed, every chunk that must exist present.

Zarr alone reads a missing chunk back as the array's fill value and a damaged one as
whatever its bytes decode to, so a damaged atlas answers queries with wrong numbers and
exit 0. Three rules close that:

1. Every array ends its codec chain with ``crc32c`` (:data:`CHECKSUM`): a flipped byte no
   longer decodes.
2. Writers store every chunk, fill-valued ones included (``write_empty_chunks``), so in a
   finished atlas the chunk grid *is* the record of the chunks that must exist.
3. Queries read through :class:`StrictStore`, which turns a missing or corrupt chunk into an
   :class:`ChunkError` naming the chunk, instead of a fill value or a bare ``ValueError``.

Atlases written before these rules (root attr ``integrity`` absent) are read as before; a
``verify`` of one reports its arrays as unchecked. :func:`verify` walks every key of the
store: missing, corrupt and unexpected chunks, and metadata that does not parse.
"""

from __future__ import annotations

import json
import re
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from storage.errors import AtlasError
from storage.layout import WORK

CHECKSUM = Crc32cCodec()
ARRAYS = "arrays"
"""Group attr listing the arrays written into the group (rule 2 for whole arrays)."""
INTEGRITY = {"checksum": "crc32c", "empty_chunks": "written"}
"""Root attr ``integrity`` of an atlas written under the rules above."""

_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
_CHUNK = re.compile(r"^(?:(.*)/)?c((?:/\d+)*)$")

# Rule 2, for every writer in this process (workers open arrays again, so a per-array
# setting made at creation would not reach them).
zarr.config.set({"array.write_empty_chunks": True})


class ChunkError(AtlasError):
    """A chunk of the atlas is missing or does not match its checksum."""


def compressors(*base: Any) -> list[Any]:
    """The bytes-to-bytes codecs of an atlas array: ``base`` (default: zstd), then crc32c."""
    return [*(base or (ZstdCodec(level=0),)), CHECKSUM]


def chunk_array(key: str) -> str | None:
    """The array path of a chunk key (``a/b/c/0/1`` -> ``a/b``), None for metadata keys."""
    if key.rsplit("/", 1)[-1] in _METADATA:
        return None
    m = _CHUNK.match(key)
    return (m.group(1) or "") if m else None


def crc_ok(data: bytes) -> bool:
    """Whether the trailing 4 bytes are the little-endian crc32c of the rest (the layout
    zarr's ``crc32c`` codec writes)."""
    if len(data) < 4:
        return False
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def has_checksum(meta: dict[str, Any]) -> bool:
    return any(isinstance(c, dict) and c.get("name") == "crc32c" for c in meta.get("codecs", []))


def base_store(path: str, read_only: bool) -> Store:
    """The Zarr store of an atlas path: a local directory or an fsspec URL."""
    if "://" in path and not path.startswith("file://"):
        try:
            return FsspecStore.from_url(path, read_only=read_only)
        except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs
            raise AtlasError(f"cannot reach atlas location {path}: {e}") from None
    return LocalStore(path.removeprefix("file://"), read_only=read_only)


class StrictStore(WrapperStore[Store]):
    """A read-only store whose chunk reads fail loudly: a missing chunk raises instead of
    reading back as the fill value, and a chunk of a checksummed array is checked before
    zarr decodes it, so the error names the chunk (zarr's own check would say neither which
    array nor which chunk)."""

    def __init__(self, store: Store, label: str) -> None:
        super().__init__(store)
        self.label = label
        self._checked: dict[str, bool] = {}

    def _with_store(self, store: Store) -> StrictStore:
        return type(self)(store, self.label)

    async def _checksummed(self, array: str, prototype: BufferPrototype) -> bool:
        if array not in self._checked:
            raw = await self._store.get(f"{array}/zarr.json" if array else "zarr.json", prototype)
            self._checked[array] = raw is not None and has_checksum(json.loads(raw.to_bytes()))
        return self._checked[array]

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:  # fmt: skip
        buf = await self._store.get(key, prototype, byte_range)
        array = chunk_array(key)
        if array is None:  # metadata: zarr would fail on it with a bare JSONDecodeError
            if buf is not None and key.endswith("zarr.json") and byte_range is None:
                try:
                    json.loads(buf.to_bytes())
                except ValueError:
                    raise ChunkError(f"metadata {key} of {self.label} is corrupt (not JSON) "
                                     f"(`neuronmap verify {self.label}`)") from None  # fmt: skip
            return buf
        if array.split("/", 1)[0] == WORK:
            return buf
        if buf is None:
            raise ChunkError(
                f"chunk {key} of {self.label} is missing: the atlas is damaged or unfinished "
                f"(`neuronmap verify {self.label}` lists every problem)"
            )
        if byte_range is None and await self._checksummed(array, prototype) and not crc_ok(
            buf.to_bytes()
        ):
            raise ChunkError(
                f"chunk {key} of {self.label} is corrupt (checksum mismatch) "
                f"(`neuronmap verify {self.label}` lists every problem)"
            )
        return buf


def remove_strays(path: str) -> list[str]:
    """Delete what killed writers leave behind (zarr's ``*.partial`` temporary files)."""
    store = base_store(path, read_only=False)
    strays = [k for k in sync(_keys(store)) if k.endswith(".partial")]
    for k in strays:
        sync(store.delete(k))
    return strays


def open_root(path: str, mode: str) -> zarr.Group:
    """Open an atlas's root group: strict reads for a read-only atlas written under the
    integrity rules, the plain store otherwise (writers, and atlases from before the rules)."""
    root = zarr.open_group(base_store(path, read_only=mode == "r"), mode=mode)
    if mode == "r" and root.attrs.get("integrity") == INTEGRITY:
        root = zarr.open_group(StrictStore(base_store(path, read_only=True), path), mode="r")
    return root


# ---------------------------------------------------------------------- verify


async def _keys(store: Store) -> list[str]:
    return sorted([k async for k in store.list()])


def verify(path: str) -> dict[str, Any]:
    """Check every array of the atlas at ``path`` (families included, ``_work`` skipped):

    - ``missing``: arrays a group records but that are gone, and chunks of the grid that
      are not stored (in an atlas written under the
      integrity rules every chunk is stored; older atlases skip fill-valued chunks, so
      missing chunks are reported only for checksummed arrays);
    - ``corrupt``: chunks whose crc32c does not match, and metadata that does not parse;
    - ``unexpected``: stored chunks outside the grid, or keys that belong to no array;
    - ``unchecked``: arrays without a checksum (written by an older neuronmap).

    Returns ``{"path", "ok", "arrays", "chunks", "missing", "corrupt", "unexpected",
    "unchecked"}``; ``ok`` is true when the first three are empty.
    """
    store = base_store(path, read_only=True)
    proto = default_buffer_prototype()
    keys = [k for k in sync(_keys(store)) if k.split("/", 1)[0] != WORK]
    metas: dict[str, dict[str, Any]] = {}
    listed: dict[str, list[str]] = {}  # group -> the arrays it records
    corrupt: list[str] = []
    for k in keys:
        if k.rsplit("/", 1)[-1] == "zarr.json":
            raw = sync(store.get(k, proto))
            try:
                meta = json.loads(raw.to_bytes()) if raw is not None else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                corrupt.append(f"{k} (metadata does not parse)")
                continue
            node = k[: -len("zarr.json")].rstrip("/")
            if meta.get("node_type") == "array":
                metas[node] = meta
            elif meta.get("node_type") == "group":
                listed[node] = list(meta.get("attributes", {}).get(ARRAYS, []))
    stored: dict[str, set[str]] = {a: set() for a in metas}
    unexpected: list[str] = []
    for k in keys:
        a = chunk_array(k)
        if a is None:
            if k.rsplit("/", 1)[-1] != "zarr.json":  # e.g. a `.partial` left by a killed writer
                unexpected.append(k)
            continue
        if a in stored:
            stored[a].add(k)
        else:
            unexpected.append(k)
    missing: list[str] = [f"{g}/{a}".lstrip("/") + " (whole array)"
                          for g, names in sorted(listed.items()) for a in names
                          if f"{g}/{a}".lstrip("/") not in metas]  # fmt: skip
    unchecked: list[str] = []
    n_chunks = 0
    for a, meta in sorted(metas.items()):
        arr = zarr.open_array(store, path=a, mode="r")
        grid = np.ndindex(*arr.cdata_shape) if arr.ndim else [()]
        want = {f"{a}/{arr.metadata.encode_chunk_key(tuple(c))}" if a
                else arr.metadata.encode_chunk_key(tuple(c)) for c in grid}  # fmt: skip
        checked = has_checksum(meta)
        if not checked:
            unchecked.append(a)
        else:
            missing += sorted(want - stored[a])
        unexpected += sorted(stored[a] - want)
        for k in sorted(stored[a] & want):
            n_chunks += 1
            if checked:
                raw = sync(store.get(k, proto))
                if raw is None or not crc_ok(raw.to_bytes()):
                    corrupt.append(f"{k} (checksum mismatch)")
    return {
        "path": path,
        "ok": not (missing or corrupt or unexpected),
        "arrays": len(metas),
        "chunks": n_chunks,
        "missing": missing,
        "corrupt": corrupt,
        "unexpected": unexpected,
        "unchecked": unchecked,
    }
