"""The atlas: one Zarr v3 group holding corpus, per-neuron statistics and examples.

Layout (paths other stages and tools rely on)::

    attrs: schema_version, job, code_version, tokenizer, created, updated
    corpus/tokens [n_seq, seq_len] int32, doc_ids [n_seq], sources [n_seq], mask [n_seq, seq_len]
    corpus/vocab_bytes, corpus/vocab_offsets       token id -> raw bytes (decoding without models)
    corpus/sample_positions [n_sample]             flat positions of the activation sample
    models/<m>/layers/<L>/stats/{count,mean,var,skew,kurt,min,max,frac_active,hist,hist_edges,
                                 dead,massive}
    models/<m>/layers/<L>/topk/{values,positions}  [d_mlp, k]; positions index corpus/tokens.flat
    models/<m>/layers/<L>/sample [n_sample, d_mlp] float16 (optional)
    _work/<m>/shard_<i>/...                        per-shard partials, removed after the merge
    _manifest (attrs)                              which shards of which stage are complete

Writers follow the rules of DESIGN.md: arrays are created with their final shape, every
corpus shard maps to whole chunks, one writer per chunk, and a region counts as written
only once the manifest says so (Zarr reads unwritten chunks back as the fill value).
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from storage.dictionaries import DictionariesMixin, jsonable
from storage.errors import AtlasError
from storage.universality import UniversalityMixin

SCHEMA_VERSION = 1
STAT_NAMES = ("count", "mean", "var", "skew", "kurt", "min", "max", "frac_active", "hist",
              "dead", "massive")  # fmt: skip
_STAT_DTYPES = {"count": "int64", "hist": "int64", "dead": "bool", "massive": "bool",
                "min": "float32", "max": "float32"}  # fmt: skip


_FAST = [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")]


def _utf8(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def mark_token(left: bytes, tok: bytes, right: bytes) -> str:
    """``left[[tok]]right`` as text; a token that is part of a multi-byte character (byte-level
    BPE splits accents and non-Latin scripts) is widened to the whole character."""
    full = left + tok + right
    a, b = len(left), len(left) + len(tok)
    while 0 < a < len(full) and full[a] & 0xC0 == 0x80:  # continuation byte: step back
        a -= 1
    while b < len(full) and full[b] & 0xC0 == 0x80:
        b += 1
    return f"{_utf8(full[:a])}[[{_utf8(full[a:b])}]]{_utf8(full[b:])}"


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


def _fill(dtype: str) -> Any:
    return {"bool": False}.get(dtype, -1 if dtype.startswith("int") else float("nan"))


@dataclass
class Example:
    """One max-activating token with its context, decoded from the stored vocabulary."""

    rank: int
    value: float
    position: int
    sequence: int
    token_index: int
    token: str
    text: str  # context with the activating token marked as [[token]]
    source: str


@dataclass
class NeuronRecord:
    """A neuron's statistics and top examples, as ``neuronmap neuron`` shows it."""

    model: str
    layer: int
    index: int
    stats: dict[str, Any]
    examples: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Atlas(UniversalityMixin, DictionariesMixin):
    """Read and write access to one atlas. ``Atlas.open(path)`` is the query entry point."""

    def __init__(self, root: zarr.Group, path: str):
        self.root = root
        self.path = path
        self._vocab: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ open / create

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> Atlas:
        """Open an existing atlas (``mode="r"`` for queries, ``"r+"`` for writers)."""
        p = str(path)
        if "://" not in p and not (Path(p) / "zarr.json").is_file():
            raise AtlasError(f"no atlas at {p} (no zarr.json): run `neuronmap run` first")
        try:
            root = zarr.open_group(p, mode=mode)
        except Exception as e:  # zarr raises several types for unreadable stores
            raise AtlasError(f"cannot open atlas {p}: {e}") from e
        if root.attrs.get("schema_version") != SCHEMA_VERSION:
            raise AtlasError(
                f"{p} is not a neuronmap atlas of schema {SCHEMA_VERSION} "
                f"(found {root.attrs.get('schema_version')!r})"
            )
        return cls(root, p)

    @classmethod
    def create(cls, path: str | Path, attrs: Mapping[str, Any]) -> Atlas:
        """Create an empty atlas; refuses to touch an existing directory."""
        p = str(path)
        if "://" not in p and Path(p).exists() and (not Path(p).is_dir() or any(Path(p).iterdir())):
            raise AtlasError(f"{p} already exists; pick another --atlas or pass --overwrite")
        root = zarr.open_group(p, mode="w")
        root.attrs.update(
            {"schema_version": SCHEMA_VERSION, "created": _now(), "updated": _now(), **attrs}
        )
        root.create_group("models")
        return cls(root, p)

    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / "zarr.json").is_file()

    @staticmethod
    def remove(path: str | Path) -> None:
        shutil.rmtree(path, ignore_errors=False)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    def touch(self, **attrs: Any) -> None:
        self.root.attrs.update({"updated": _now(), **attrs})

    # ------------------------------------------------------------------ corpus

    def write_corpus(
        self,
        tokens: np.ndarray,
        doc_ids: np.ndarray,
        sources: np.ndarray,
        source_names: Sequence[str],
        mask: np.ndarray,
        vocab: Sequence[bytes],
        shard_sequences: int,
        sample_positions: np.ndarray,
        attrs: Mapping[str, Any],
    ) -> None:
        """Write the tokenized corpus; one chunk per shard of ``shard_sequences`` rows."""
        if "corpus" in self.root:
            raise AtlasError(f"{self.path} already has a corpus")
        g = self.root.create_group("corpus")
        n, s = tokens.shape
        rows = min(shard_sequences, n)
        g.create_array("tokens", data=tokens.astype(np.int32), chunks=(rows, s))
        g.create_array("mask", data=mask.astype(bool), chunks=(rows, s))
        g.create_array("doc_ids", data=doc_ids.astype(np.int64), chunks=(rows,))
        g.create_array("sources", data=sources.astype(np.int16), chunks=(rows,))
        lens = np.fromiter((len(b) for b in vocab), dtype=np.int64, count=len(vocab))
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        blob = np.frombuffer(b"".join(vocab), dtype=np.uint8)
        g.create_array("vocab_bytes", data=blob if blob.size else np.zeros(1, np.uint8))
        g.create_array("vocab_offsets", data=offsets)
        g.create_array("sample_positions", data=sample_positions.astype(np.int64))
        g.attrs.update(
            {
                "source_names": list(source_names),
                "shard_sequences": rows,
                "n_sequences": n,
                "seq_len": s,
                "n_tokens": int(mask.sum()),
                **attrs,
            }
        )

    @property
    def corpus(self) -> zarr.Group:
        if "corpus" not in self.root:
            raise AtlasError(f"{self.path} has no corpus yet")
        return self.root["corpus"]

    def shard_ranges(self) -> list[tuple[int, int]]:
        """Contiguous sequence ranges, one per shard (= one Zarr chunk of corpus/tokens)."""
        a = self.corpus.attrs
        n, rows = a["n_sequences"], a["shard_sequences"]
        return [(i, min(i + rows, n)) for i in range(0, n, rows)]

    def read_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and mask of one shard."""
        a, b = self.shard_ranges()[shard]
        return self.corpus["tokens"][a:b], self.corpus["mask"][a:b]

    def sample_rows_per_shard(self) -> int:
        n = self.corpus["sample_positions"].shape[0]
        return n // max(len(self.shard_ranges()), 1)

    # ------------------------------------------------------------------ decoding

    def _vocab_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._vocab is None:
            self._vocab = (self.corpus["vocab_bytes"][:], self.corpus["vocab_offsets"][:])
        return self._vocab

    def token_bytes(self, ids: Iterable[int]) -> bytes:
        blob, off = self._vocab_arrays()
        return b"".join(blob[off[i] : off[i + 1]].tobytes() for i in ids if 0 <= i < len(off) - 1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, reconstructed from stored bytes (no tokenizer needed)."""
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ models

    @property
    def models(self) -> list[str]:
        """Models mapped over this atlas's own corpus (see :attr:`all_models` for families)."""
        return sorted(self.root["models"].group_keys())

    # A family (e.g. seeds trained with their own tokenizer) has its own corpus, so it is a
    # complete atlas of its own, nested at families/<name>; queries find its models by name.

    @property
    def families(self) -> list[str]:
        if "families" not in self.root:
            return []
        return sorted(self.root["families"].group_keys())

    def family(self, name: str) -> Atlas:
        if name not in self.families:
            raise AtlasError(f"family {name!r} is not in {self.path}; it has {self.families}")
        return Atlas.open(self.family_path(self.path, name))

    @staticmethod
    def family_path(path: str | Path, name: str) -> str:
        return f"{str(path).rstrip('/')}/families/{name}"

    def ensure_families_group(self) -> None:
        self.root.require_group("families")

    @property
    def all_models(self) -> list[str]:
        return self.models + [m for f in self.families for m in self.family(f).models]

    def owner(self, model: str) -> Atlas:
        """The atlas (this one or a family) that holds ``model``."""
        if model in self.root["models"]:
            return self
        for f in self.families:
            fam = self.family(f)
            if model in fam.root["models"]:
                return fam
        raise AtlasError(f"model {model!r} is not in {self.path}; it has {self.all_models}")

    def model_group(self, model: str) -> zarr.Group:
        if model not in self.root["models"]:
            return self.owner(model).root["models"][model]
        return self.root["models"][model]

    def model_attrs(self, model: str) -> dict[str, Any]:
        return dict(self.model_group(model).attrs)

    def layers(self, model: str) -> list[int]:
        return sorted(int(k) for k in self.model_group(model)["layers"].group_keys())

    def init_model(
        self,
        model: str,
        attrs: Mapping[str, Any],
        layers: Sequence[int],
        d_mlp: int,
        k: int,
        hist_edges: np.ndarray,
        sample_layers: Sequence[int],
    ) -> None:
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
                dtype = _STAT_DTYPES.get(name, "float64")
                shape = (d_mlp, bins) if name == "hist" else (d_mlp,)
                st.require_array(name, shape=shape, dtype=dtype, fill_value=_fill(dtype))
            if "hist_edges" not in st:
                st.create_array("hist_edges", data=hist_edges.astype(np.float32))
            tk = L.require_group("topk")
            tk.require_array("values", shape=(d_mlp, k), dtype="float32", fill_value=np.nan)
            tk.require_array("positions", shape=(d_mlp, k), dtype="int64", fill_value=-1)
            if layer in sample_layers and n_sample:
                L.require_array(
                    "sample", shape=(n_sample, d_mlp), chunks=(per_shard, d_mlp),
                    dtype="float16", fill_value=0.0, compressors=None,
                )  # fmt: skip

    def write_layer_stats(
        self, model: str, layer: int, stats: Mapping[str, np.ndarray],
        top_values: np.ndarray, top_positions: np.ndarray,
    ) -> None:  # fmt: skip
        L = self.model_group(model)["layers"][str(layer)]
        for name in STAT_NAMES:
            L["stats"][name][...] = stats[name]
        L["topk"]["values"][...] = top_values
        L["topk"]["positions"][...] = top_positions

    def write_props(self, model: str, layer: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Weight-derived neuron properties and labels (models/<m>/layers/<L>/props/...)."""
        g = self.model_group(model)["layers"][str(layer)].require_group("props")
        for k, v in arrays.items():
            g.create_array(k, data=np.asarray(v), overwrite=True)

    def props(self, model: str, layer: int) -> dict[str, np.ndarray]:
        L = self.model_group(model)["layers"][str(layer)]
        if "props" not in L:
            return {}
        return {k: L["props"][k][...] for k in L["props"].array_keys()}

    def write_sample(self, model: str, layer: int, shard: int, rows: np.ndarray) -> None:
        """One shard's rows of a layer's sample: exactly one chunk, written by one worker."""
        per = self.sample_rows_per_shard()
        arr = self.model_group(model)["layers"][str(layer)]["sample"]
        if rows.shape != (per, arr.shape[1]):  # zarr would silently broadcast or truncate
            raise AtlasError(
                f"sample rows of shard {shard} for {model!r} L{layer} have shape {rows.shape}, "
                f"expected {(per, arr.shape[1])}"
            )
        arr[shard * per : (shard + 1) * per] = rows.astype(np.float16)

    # ------------------------------------------------------------------ partials

    def _work(self) -> zarr.Group:
        return _require_group(self.root, "_work")

    def write_partial(self, model: str, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Persist one shard's mergeable partial (stacked over layers); overwrites a stale one."""
        g = _require_group(self._work(), model)
        name = f"shard_{shard:06d}"
        if name in g:
            del g[name]
        sg = g.create_group(name)
        for key, a in arrays.items():
            a = np.asarray(a)
            # written once, read once by the merge: favour speed over ratio
            sg.create_array(key, data=a if a.ndim else a.reshape(1), compressors=_FAST)

    def read_partial(self, model: str, shard: int) -> dict[str, np.ndarray]:
        try:
            sg = self.root["_work"][model][f"shard_{shard:06d}"]
        except KeyError:
            raise AtlasError(
                f"partial of shard {shard} of model {model!r} is missing in {self.path}"
            ) from None
        return {k: sg[k][...] for k in sg.array_keys()}

    def drop_partials(self, model: str) -> None:
        if "_work" in self.root and model in self.root["_work"]:
            del self.root["_work"][model]

    # ------------------------------------------------------------------ manifest

    def _manifest(self) -> zarr.Group:
        return self.root.require_group("_manifest")

    def done(self, stage: str) -> dict[str, Any]:
        """Manifest entry of a stage: {"fingerprint", "shards": [...], "complete": bool}."""
        if "_manifest" not in self.root:
            return {}
        return dict(self.root["_manifest"].attrs.get(stage, {}))

    def mark(self, stage: str, fingerprint: str, shards: Iterable[int] = (),
             complete: bool = False) -> None:  # fmt: skip
        """Record finished shards of a stage. Only the driver writes the manifest."""
        m = self._manifest()
        cur = dict(m.attrs.get(stage, {}))
        if cur.get("fingerprint") != fingerprint:
            cur = {"fingerprint": fingerprint, "shards": [], "complete": False}
        cur["shards"] = sorted(set(cur["shards"]) | {int(s) for s in shards})
        cur["complete"] = bool(complete or cur.get("complete"))
        m.attrs[stage] = cur
        self.touch()

    # ------------------------------------------------------------------ run accounting

    MAX_RUNS = 50

    def record_stage(self, run: str, entry: Mapping[str, Any]) -> None:
        """Append one stage's accounting (tokens, forwards, seconds, workers) to run ``run``;
        the run is created on its first stage. Only the driver writes it, into a group of its
        own: the root's attrs are cached per open atlas, and a stale copy written back by
        another writer (``touch``) would drop entries."""
        g = _require_group(self.root, "_runs")
        runs = list(g.attrs.get("runs", []))
        cur = next((r for r in runs if r.get("run") == run), None)
        if cur is None:
            cur = {"run": run, "started": _now(), "stages": []}
            runs.append(cur)
        cur["stages"].append(jsonable(dict(entry)))
        cur["finished"] = _now()
        g.attrs["runs"] = runs[-self.MAX_RUNS :]

    def runs(self) -> list[dict[str, Any]]:
        """Every recorded run, latest last: ``{"run", "started", "finished", "stages": [...]}``."""
        if "_runs" not in self.root:
            return []
        return list(self.root["_runs"].attrs.get("runs", []))

    # ------------------------------------------------------------------ queries

    def stats(self, model: str, layer: int) -> dict[str, np.ndarray]:
        """All per-neuron statistics of one layer (small arrays, read whole)."""
        if model not in self.root["models"]:
            return self.owner(model).stats(model, layer)
        lg = self.model_group(model)["layers"]
        if str(layer) not in lg:
            raise AtlasError(
                f"layer {layer} of model {model!r} is not in {self.path}; "
                f"recorded layers: {self.layers(model)}"
            )
        st = lg[str(layer)]["stats"]
        return {k: st[k][...] for k in st.array_keys()}

    def neuron(self, model: str, layer: int, index: int, k: int | None = None,
               context: int = 12) -> NeuronRecord:  # fmt: skip
        """Statistics and top-``k`` examples of one neuron, decoded with the atlas vocabulary."""
        if model not in self.root["models"]:  # a family's model: its own corpus decodes it
            return self.owner(model).neuron(model, layer, index, k, context)
        self._require_complete(model)
        lg = self.model_group(model)["layers"]
        if str(layer) not in lg:
            raise AtlasError(
                f"layer {layer} of model {model!r} is not in {self.path}; "
                f"recorded layers: {self.layers(model)}"
            )
        L = lg[str(layer)]
        d = L["stats"]["mean"].shape[0]
        if not 0 <= index < d:
            raise AtlasError(f"neuron index {index} out of range: layer {layer} has {d} neurons")
        st = L["stats"]
        stats: dict[str, Any] = {}
        for name in STAT_NAMES:
            if name != "hist":
                stats[name] = np.asarray(st[name][index]).item()
        stats["hist"] = st["hist"][index].tolist()
        stats["hist_edges"] = st["hist_edges"][...].tolist()
        props = {}
        if "props" in L:
            for name in L["props"].array_keys():
                v = L["props"][name][index]
                props[name] = v.tolist() if np.ndim(v) else np.asarray(v).item()
            for key in ("top_promoted", "top_suppressed"):
                if key in props:
                    props[key + "_tokens"] = [self.decode([t]) for t in props[key]]
        stats["props"] = props
        values = L["topk"]["values"][index]
        positions = L["topk"]["positions"][index]
        if k is not None:
            values, positions = values[:k], positions[:k]
        examples = [
            self._example(r, float(v), int(p), context)
            for r, (v, p) in enumerate(zip(values, positions, strict=True))
            if p >= 0
        ]
        return NeuronRecord(model, layer, index, stats, examples)

    def _example(self, rank: int, value: float, position: int, context: int) -> Example:
        c = self.corpus
        seq_len = c.attrs["seq_len"]
        seq, t = divmod(position, seq_len)
        lo = max(0, t - context)
        hi = t + 1 + max(context // 3, 2)
        toks = c["tokens"][seq, lo:hi]
        keep = c["mask"][seq, lo:hi]  # drops BOS and padding from the shown context
        j = t - lo
        left = self.token_bytes(int(x) for x, ok in zip(toks[:j], keep[:j], strict=True) if ok)
        tok = self.token_bytes([int(toks[j])])
        right = self.token_bytes(
            int(x) for x, ok in zip(toks[j + 1 :], keep[j + 1 :], strict=True) if ok
        )
        names = c.attrs["source_names"]
        src = names[int(c["sources"][seq])] if names else ""
        text = mark_token(left, tok, right)
        return Example(rank, value, position, seq, t, _utf8(tok), text, src)

    def _require_complete(self, model: str) -> None:
        if not self.model_attrs(model).get("complete"):
            raise AtlasError(
                f"model {model!r} in {self.path} is not complete yet; "
                "finish it with `neuronmap run --resume`"
            )

    def info(self) -> dict[str, Any]:
        """Summary of the atlas for ``neuronmap info``."""
        a = self.attrs
        out: dict[str, Any] = {
            "path": self.path,
            "schema_version": a.get("schema_version"),
            "created": a.get("created"),
            "updated": a.get("updated"),
            "code_version": a.get("code_version"),
            "tokenizer": a.get("tokenizer"),
            "models": {},
        }
        if "corpus" in self.root:
            ca = self.corpus.attrs
            out["corpus"] = {
                "n_sequences": ca["n_sequences"],
                "seq_len": ca["seq_len"],
                "n_tokens": ca["n_tokens"],
                "shards": len(self.shard_ranges()),
                "sources": ca["source_names"],
                "sample_tokens": int(self.corpus["sample_positions"].shape[0]),
            }
        for m in self.models:
            ma = self.model_attrs(m)
            layers = {}
            if ma.get("complete"):
                for layer in self.layers(m):
                    st = self.model_group(m)["layers"][str(layer)]["stats"]
                    dead = st["dead"][...]
                    layers[layer] = {
                        "dead_frac": float(dead.mean()),
                        "massive": int(st["massive"][...].sum()),
                        "mean_frac_active": float(np.nanmean(st["frac_active"][...])),
                    }
            out["models"][m] = {
                k: ma.get(k)
                for k in (
                    "source",
                    "architecture",
                    "n_layers",
                    "d_mlp",
                    "hook_site",
                    "dtype",
                    "complete",
                    "tokens_per_second",
                )  # fmt: skip
            } | {"layers": layers}
            dicts = self.dictionary_overview(m)
            if dicts:
                out["models"][m]["dictionaries"] = dicts
        if self.families:
            out["families"] = {f: self.family(f).info() for f in self.families}
        if "universality" in self.root:
            out["universality"] = self.universality_overview()
        out["runs"] = self.runs()
        return out
