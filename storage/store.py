"""The writing side of the atlas, used by ``flows``: create, pre-size, write, manifest,
partials, run accounting. Queries are :class:`storage.atlas.Atlas`, which this extends.

Writers follow the rules of DESIGN.md: arrays are created with their final shape, every
corpus shard maps to whole chunks, one writer per chunk, and a region counts as written
only once the manifest says so (Zarr reads unwritten chunks back as the fill value).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from storage import location
from storage.atlas import Atlas, routed
from storage.errors import AtlasError
from storage.integrity import ARRAYS, INTEGRITY, base_store, compressors, remove_strays
from storage.layout import (
    ABOUT,
    FAMILIES,
    MANIFEST,
    METHODS,
    RUNS,
    SCHEMA_VERSION,
    STAT_DTYPES,
    STAT_NAMES,
    TAXONOMY,
    UNIVERSALITY,
    WORK,
    dims,
    fill,
    pair_key,
    partial_name,
    steering_key,
)
from storage.records import jsonable

_FAST = compressors(BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"))


def _array(group: zarr.Group, name: str, data: Any = None, *, unit: str = "neuron",
           replace: bool = False, **kw: Any) -> zarr.Array:  # fmt: skip
    """Create one atlas array: crc32c last in its codecs, dimension names and a description
    attr, so plain zarr and xarray users can read it (``storage.integrity``, layout docs).
    ``data`` given: written whole; else ``shape``/``dtype`` (and ``fill_value``) pre-size it.
    An existing array of that name is returned as is, or replaced with ``replace``. The
    group's ``arrays`` attr lists it, so a whole array that goes missing is noticed."""
    if name in group:
        if not replace:
            return group[name]
        del group[name]
    if data is not None:
        data = np.asarray(data)
        kw.setdefault("shape", data.shape)
        kw.setdefault("dtype", data.dtype)
    kw["compressors"] = compressors(*(kw.get("compressors") or ()))
    attrs = {"description": ABOUT[name]} if name in ABOUT else {}
    arr = group.create_array(name, dimension_names=dims(name, len(kw["shape"]), unit),
                             attributes=attrs, **kw)  # fmt: skip
    if data is not None:
        arr[...] = data
    listed = list(group.attrs.get(ARRAYS, []))
    if name not in listed:  # the record `verify` and queries check the group against
        group.attrs[ARRAYS] = sorted([*listed, name])
    return arr


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _require_group(parent: zarr.Group, name: str) -> zarr.Group:
    """``require_group`` that tolerates another worker creating the group at the same moment
    (Zarr's check-then-create is not atomic across processes)."""
    for _ in range(5):
        try:
            return parent.require_group(name)
        except (ContainsGroupError, ContainsArrayError, FileExistsError):
            time.sleep(0.01)
    return parent[name]


class Store(Atlas):
    """Read and write access to one atlas (``Store.open``/``Store.create``)."""

    MODE = "r+"
    MAX_RUNS = 50

    @classmethod
    def create(cls, path: str | Path, attrs: Mapping[str, Any]) -> Store:
        """Create an empty atlas; refuses to touch an existing directory."""
        p = str(path)
        if location.occupied(p):  # also a prefix holding other objects: never cleared
            raise AtlasError(f"{p} already exists; pick another --atlas or pass --overwrite")
        root = zarr.open_group(base_store(p, read_only=False), mode="w")
        root.attrs.update({"schema_version": SCHEMA_VERSION, "integrity": INTEGRITY,
                           "created": _now(), "updated": _now(), **attrs})  # fmt: skip
        root.create_group("models")
        return cls(root, p)

    @staticmethod
    def remove(path: str | Path) -> None:
        location.remove(path)

    def touch(self, **attrs: Any) -> None:
        self.root.attrs.update({"updated": _now(), **attrs})

    def finish(self, run: str) -> None:
        """Mark the whole job complete (root attr ``complete``) and drop what only a running
        job needs: ``_work`` partials, here and in every family, and temporary files that
        killed writers left."""
        for at in self._holders():
            if WORK in at.root:
                del at.root[WORK]
        remove_strays(self.path)
        self.touch(complete=True, finished_run=run)

    def ensure_families_group(self) -> None:
        self.root.require_group(FAMILIES)

    # ------------------------------------------------------------------ corpus

    def write_corpus(
        self, tokens: np.ndarray, doc_ids: np.ndarray, sources: np.ndarray,
        source_names: Sequence[str], mask: np.ndarray, vocab: Sequence[bytes],
        shard_sequences: int, sample_positions: np.ndarray, attrs: Mapping[str, Any],
    ) -> None:  # fmt: skip
        """Write the tokenized corpus; one chunk per shard of ``shard_sequences`` rows."""
        if "corpus" in self.root:
            raise AtlasError(f"{self.path} already has a corpus")
        g = self.root.create_group("corpus")
        n, s = tokens.shape
        rows = min(shard_sequences, n)
        _array(g, "tokens", tokens.astype(np.int32), chunks=(rows, s))
        _array(g, "mask", mask.astype(bool), chunks=(rows, s))
        _array(g, "doc_ids", doc_ids.astype(np.int64), chunks=(rows,))
        _array(g, "sources", sources.astype(np.int16), chunks=(rows,))
        lens = np.fromiter((len(b) for b in vocab), dtype=np.int64, count=len(vocab))
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        blob = np.frombuffer(b"".join(vocab), dtype=np.uint8)
        _array(g, "vocab_bytes", blob if blob.size else np.zeros(1, np.uint8))
        _array(g, "vocab_offsets", offsets)
        _array(g, "sample_positions", sample_positions.astype(np.int64))
        g.attrs.update({"source_names": list(source_names), "shard_sequences": rows,
                        "sample_per_shard": len(sample_positions) // -(-n // rows),
                        "n_sequences": n, "seq_len": s, "n_tokens": int(mask.sum()), **attrs})  # fmt: skip

    def extend_corpus(self, tokens: np.ndarray, doc_ids: np.ndarray, sources: np.ndarray,
                      source_names: Sequence[str], mask: np.ndarray, sample_tail: np.ndarray,
                      attrs: Mapping[str, Any]) -> int:  # fmt: skip
        """Grow the corpus to ``tokens`` (the stored sequences must be its first rows, with
        the same source names first) and return the first shard whose rows changed: the old
        last shard when it was short, else the first new one. ``sample_tail`` holds the
        sample positions of that shard onward (the per-shard rate is kept). Every model's
        sample array grows with it; what those shards held must be recorded again."""
        c = self.corpus
        n_old, rows = int(c.attrs["n_sequences"]), int(c.attrs["shard_sequences"])
        n = len(tokens)
        first = n_old // rows
        per = self.sample_rows_per_shard()
        n_shards = -(-n // rows)
        if len(sample_tail) != (n_shards - first) * per:
            raise AtlasError(f"sample positions of shards {first}.. of {self.path}: "
                             f"{len(sample_tail)} given, {(n_shards - first) * per} expected")  # fmt: skip
        # first what must be done again (a run killed after this point grows the corpus
        # again next time: the corpus attrs, written last, still say it is the old one)
        m = self.root.require_group(MANIFEST)
        for stage, entry in dict(m.attrs).items():  # shards from `first` are recorded again
            m.attrs[stage] = {**entry, "complete": False,
                              "shards": [i for i in entry.get("shards", []) if i < first]}  # fmt: skip
        for model in self.models:
            self.model_group(model).attrs["complete"] = False
        self.touch(complete=False)
        a = first * rows
        for name, data, dtype in (("tokens", tokens, np.int32), ("mask", mask, bool),
                                  ("doc_ids", doc_ids, np.int64), ("sources", sources, np.int16)):  # fmt: skip
            arr = c[name]
            arr.resize((n, *arr.shape[1:]))
            arr[a:n] = np.asarray(data[a:n]).astype(dtype)
        sp = c["sample_positions"]
        if per:
            sp.resize((n_shards * per,))
            sp[first * per :] = sample_tail
            for model in self.models:
                g = self.model_group(model)["layers"]
                for layer in g.group_keys():
                    if "sample" in g[layer]:
                        s = g[layer]["sample"]
                        s.resize((n_shards * per, s.shape[1]))
                        s[first * per :] = 0  # rewritten by the shards recorded again
        c.attrs.update({**attrs, "source_names": list(source_names), "n_sequences": n,
                        "n_tokens": int(np.asarray(mask).sum())})  # fmt: skip
        self._corpus_meta, self._shards = None, type(self._shards)(32)
        return first

    # ------------------------------------------------------------------ neurons

    def init_model(self, model: str, attrs: Mapping[str, Any], layers: Sequence[int], d_mlp: int,
                   k: int, hist_edges: np.ndarray, sample_layers: Sequence[int]) -> None:  # fmt: skip
        """Pre-size every array of a model so that writers never resize anything."""
        g = self.root["models"].require_group(model)
        g.attrs.update({**attrs, "layers": list(layers)})
        lg = g.require_group("layers")
        bins = len(hist_edges) - 1
        per_shard = self.sample_rows_per_shard()
        n_sample = self.corpus["sample_positions"].shape[0]
        for layer in layers:
            L = lg.require_group(str(layer))
            st = L.require_group("stats")
            for name in STAT_NAMES:
                dtype = STAT_DTYPES.get(name, "float64")
                shape = (d_mlp, bins) if name == "hist" else (d_mlp,)
                _array(st, name, shape=shape, dtype=dtype, fill_value=fill(dtype))
            _array(st, "hist_edges", hist_edges.astype(np.float32))
            tk = L.require_group("topk")
            _array(tk, "values", shape=(d_mlp, k), dtype="float32", fill_value=np.nan)
            _array(tk, "positions", shape=(d_mlp, k), dtype="int64", fill_value=-1)
            if layer in sample_layers and n_sample:
                # uncompressed: float16 activations barely compress, and shards write fast
                _array(L, "sample", shape=(n_sample, d_mlp), chunks=(per_shard, d_mlp),
                       dtype="float16", fill_value=0.0, compressors=[])  # fmt: skip

    @routed
    def write_layer_stats(self, model: str, layer: int, stats: Mapping[str, np.ndarray],
                          top_values: np.ndarray, top_positions: np.ndarray) -> None:  # fmt: skip
        L = self.layer_group(model, layer)
        for name in STAT_NAMES:
            L["stats"][name][...] = stats[name]
        L["topk"]["values"][...] = top_values
        L["topk"]["positions"][...] = top_positions

    @routed
    def write_taxonomy(self, model: str, layer: int, arrays: Mapping[str, np.ndarray],
                       attrs: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """A layer's taxonomy arrays and attrs (models/<m>/layers/<L>/taxonomy/...)."""
        g = self.layer_group(model, layer).require_group(TAXONOMY)
        for k, v in arrays.items():
            _array(g, k, v, replace=True)
        if attrs:
            g.attrs.update(jsonable(dict(attrs)))

    @routed
    def write_props(self, model: str, layer: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Weight-derived neuron properties and labels (models/<m>/layers/<L>/props/...)."""
        g = self.layer_group(model, layer).require_group("props")
        for k, v in arrays.items():
            _array(g, k, v, replace=True)

    @routed
    def write_sample(self, model: str, layer: int, shard: int, rows: np.ndarray) -> None:
        """One shard's rows of a layer's sample: exactly one chunk, written by one worker."""
        per = self.sample_rows_per_shard()
        arr = self.layer_group(model, layer)["sample"]
        if rows.shape != (per, arr.shape[1]):  # zarr would silently broadcast or truncate
            raise AtlasError(
                f"sample rows of shard {shard} for {model!r} L{layer} have shape {rows.shape}, "
                f"expected {(per, arr.shape[1])}"
            )
        arr[shard * per : (shard + 1) * per] = rows.astype(np.float16)

    # ------------------------------------------------------------------ partials

    def write_partial(self, key: str, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Persist one shard's mergeable partial under ``_work/<key>``; overwrites a stale one."""
        g = _require_group(_require_group(self.root, WORK), key)
        name = partial_name(shard)
        if name in g:
            del g[name]
        sg = g.create_group(name)
        for k, a in arrays.items():
            a = np.asarray(a)
            # written once, read once by the merge: favour speed over ratio
            sg.create_array(k, data=a if a.ndim else a.reshape(1), compressors=_FAST)

    def read_partial(self, key: str, shard: int,
                     only: Iterable[str] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """A persisted partial's arrays (``only``: just these, for partials read piecewise)."""
        try:
            sg = self.root[WORK][key][partial_name(shard)]
        except KeyError:
            raise AtlasError(
                f"partial of shard {shard} of {key!r} is missing in {self.path}"
            ) from None
        return {k: sg[k][...] for k in (sg.array_keys() if only is None else only)}

    def write_checkpoint(self, key: str, arrays: Mapping[str, np.ndarray], cursor: int,
                         under: str = WORK) -> None:  # fmt: skip
        """Atomically replace the checkpoint of a unit of work under ``<under>/<key>``
        (``_work``, dropped when the job finishes, or ``_state``, kept): the new
        state is written beside the old one, then the group's ``checkpoint`` attribute (the
        commit point) names it, then the old one is dropped. A run killed at any point
        leaves either checkpoint whole."""
        g = _require_group(_require_group(self.root, under), key)
        prev = g.attrs.get("checkpoint")
        serial = prev["serial"] + 1 if prev else 0
        name = f"ckpt-{serial}"
        if name in g:  # a stray of a run killed before its commit
            del g[name]
        sg = g.create_group(name)
        for k, a in arrays.items():
            a = np.asarray(a)
            sg.create_array(k, data=a if a.ndim else a.reshape(1), compressors=_FAST)
        g.attrs["checkpoint"] = {"serial": serial, "cursor": int(cursor)}
        if prev and f"ckpt-{prev['serial']}" in g:
            del g[f"ckpt-{prev['serial']}"]

    def read_checkpoint(self, key: str, under: str = WORK
                        ) -> tuple[dict[str, np.ndarray], int] | None:  # fmt: skip
        """The committed checkpoint under ``<under>/<key>`` and its cursor, or None."""
        try:
            g = self.root[under][key]
        except KeyError:
            return None
        cp = g.attrs.get("checkpoint")
        if not cp:
            return None
        sg = g[f"ckpt-{cp['serial']}"]
        return {k: sg[k][...] for k in sg.array_keys()}, int(cp["cursor"])

    def init_pair_corr(self, a: str, b: str, shape: tuple[int, int], block: tuple[int, int],
                       dtype: str) -> None:  # fmt: skip
        """Pre-size the full r matrix of ``a`` vs ``b`` (compared layers only), one chunk per
        layer pair: workers finalising different tiles never share a chunk."""
        g = self.root.require_group(UNIVERSALITY).require_group(pair_key(a, b))
        _array(g, "corr", shape=shape, chunks=block, dtype=dtype, fill_value=np.nan, replace=True)

    def write_pair_corr(self, a: str, b: str, row: int, col: int, r: np.ndarray) -> None:
        arr = self.root[UNIVERSALITY][pair_key(a, b)]["corr"]
        arr[row : row + r.shape[0], col : col + r.shape[1]] = r.astype(arr.dtype)

    def drop_partials(self, key: str) -> None:
        if WORK in self.root and key in self.root[WORK]:
            del self.root[WORK][key]

    # ------------------------------------------------------------------ manifest and runs

    def mark(self, stage: str, fingerprint: str, shards: Iterable[int] = (),
             complete: bool = False) -> None:  # fmt: skip
        """Record finished shards of a stage. Only the driver writes the manifest."""
        m = self.root.require_group(MANIFEST)
        cur = dict(m.attrs.get(stage, {}))
        if cur.get("fingerprint") != fingerprint:
            cur = {"fingerprint": fingerprint, "shards": [], "complete": False}
        cur["shards"] = sorted(set(cur["shards"]) | {int(s) for s in shards})
        cur["complete"] = bool(complete or cur.get("complete"))
        m.attrs[stage] = cur
        self.touch()

    def record_stage(self, run: str, entry: Mapping[str, Any]) -> None:
        """Append one stage's accounting (tokens, forwards, seconds, workers) to run ``run``;
        the run is created on its first stage. Only the driver writes it, into a group of its
        own: the root's attrs are cached per open atlas, and a stale copy written back by
        another writer (``touch``) would drop entries."""
        g = _require_group(self.root, RUNS)
        runs = list(g.attrs.get("runs", []))
        cur = next((r for r in runs if r.get("run") == run), None)
        if cur is None:  # started when its first stage started
            began = _dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=float(entry.get("seconds", 0)))
            cur = {"run": run, "started": began.isoformat(timespec="seconds"), "stages": []}
            runs.append(cur)
        cur["stages"].append(jsonable(dict(entry)))
        cur["finished"] = _now()
        g.attrs["runs"] = runs[-self.MAX_RUNS :]

    def record_model_loads(self, run: str, loads: list[Mapping[str, Any]]) -> None:
        """Keep, on run ``run``, how many times each worker loaded each model (``[{"node",
        "pid", "host", "device", "model_loads": {model: count}}]``): one per worker and model
        for the whole job is the goal, more means a worker restarted."""
        g = _require_group(self.root, RUNS)
        runs = list(g.attrs.get("runs", []))
        cur = next((r for r in runs if r.get("run") == run), None)
        if cur is None:  # a job whose every stage was skipped still says what it loaded
            cur = {"run": run, "started": _now(), "stages": []}
            runs.append(cur)
        cur["model_loads"] = jsonable([dict(x) for x in loads])
        g.attrs["runs"] = runs[-self.MAX_RUNS :]

    # ------------------------------------------------------------------ dictionaries

    @routed
    def write_dictionary(
        self, model: str, layer: int, method: str, run: str,
        weights: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray],
        top_values: np.ndarray, top_positions: np.ndarray, attrs: Mapping[str, Any],
    ) -> None:  # fmt: skip
        """Write one run whole, replacing an earlier run of the same name (and dropping the
        steering results of its old features, which described other directions)."""
        if method not in METHODS:
            raise AtlasError(f"unknown dictionary method {method!r}; use one of {METHODS}")
        lg = self.layer_group(model, layer)
        mg = lg.require_group(method)
        if run in mg:
            del mg[run]
        if "steering" in lg:
            prefix = steering_key(method, run, 0)[:-1]
            results = dict(lg["steering"].attrs.get("results", {}))
            lg["steering"].attrs["results"] = {k: v for k, v in results.items()
                                               if not k.startswith(prefix)}  # fmt: skip
        g = mg.create_group(run)
        for k, v in weights.items():
            _array(g, k, v)
        st = g.create_group("stats")
        for k, v in stats.items():
            _array(st, k, v, unit="feature")
        tk = g.create_group("topk")
        _array(tk, "values", np.asarray(top_values, np.float32), unit="feature")
        _array(tk, "positions", np.asarray(top_positions, np.int64), unit="feature")
        g.attrs.update(dict(attrs))

    @routed
    def write_steering(self, model: str, layer: int, results: Mapping[str, Mapping],
                       directions: Mapping[str, np.ndarray] | None = None) -> None:  # fmt: skip
        """Add or replace steering results (JSON-able, token ids) and baseline directions."""
        g = self.layer_group(model, layer).require_group("steering")
        for key, vec in (directions or {}).items():
            name = key.replace("/", "__")
            _array(g, name, np.asarray(vec, np.float32), replace=True)
        stored = dict(g.attrs.get("results", {}))
        stored.update({k: jsonable(dict(v)) for k, v in results.items()})
        g.attrs["results"] = stored

    # ------------------------------------------------------------------ universality

    def write_pair(self, a: str, b: str, arrays: Mapping[str, np.ndarray],
                   matching: Mapping[str, np.ndarray] | None, attrs: Mapping[str, Any]) -> None:  # fmt: skip
        g = self.root.require_group(UNIVERSALITY).require_group(pair_key(a, b))
        for k, v in arrays.items():
            _array(g, k, v, replace=True)
        if matching:
            m = g.require_group("matching")
            for k, v in matching.items():
                _array(m, k, v, replace=True)
        g.attrs.update(dict(attrs))

    def write_summary(self, model: str, layer: int, arrays: Mapping[str, np.ndarray],
                      attrs: Mapping[str, Any]) -> None:  # fmt: skip
        g = self.root.require_group(UNIVERSALITY).require_group("summary").require_group(model)
        lg = g.require_group(str(layer))
        for k, v in arrays.items():
            _array(lg, k, v, replace=True)
        g.attrs.update(dict(attrs))
