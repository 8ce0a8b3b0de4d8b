"""The query API: a read-only view of one atlas (``Atlas.open(path)``).

Layout in :mod:`storage.layout`; writers in :mod:`storage.store` (used by ``flows``); what
queries return in :mod:`storage.records`. A model of a family (its own tokenizer, so a nested
atlas under ``families/<name>``) is found by name from the root: every per-model query goes
through :func:`routed`, the one place that resolves which atlas holds a model.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr

from storage import location
from storage.errors import AtlasError
from storage.integrity import ARRAYS, ChunkError, open_root
from storage.layout import (
    FAMILIES,
    MANIFEST,
    METHODS,
    RUNS,
    SCHEMA_VERSION,
    STAT_NAMES,
    TAXONOMY,
    UNIVERSALITY,
    family_path,
    pair_key,
    steering_key,
)
from storage.records import Example, FeatureRecord, NeuronRecord, SteeringRecord, mark_token

F = TypeVar("F", bound=Callable[..., Any])


def routed(method: F) -> F:
    """Run a per-model method (``self, model, ...``) on the atlas that holds ``model``."""

    @functools.wraps(method)
    def wrapper(self: Atlas, model: str, *args: Any, **kwargs: Any) -> Any:
        return method(self.owner(model), model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _Lru:
    """A few recently read blocks (a layer's statistics, a shard's tokens) kept in memory:
    every Zarr read costs a round trip through its event-loop thread (~1 ms), so a neuron
    page that reads ~20 small arrays and a shard per example spends its time there."""

    def __init__(self, size: int) -> None:
        self.size, self.items = size, OrderedDict()

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = load()
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class Atlas:
    """Read access to one atlas. ``Atlas.open(path)`` is the query entry point.

    A handle caches what it has read of finished arrays (a few layers' statistics, a few
    shards' tokens): open a new handle to see data written after the first read."""

    MODE = "r"

    def __init__(self, root: zarr.Group, path: str):
        self.root = root
        self.path = path
        self._vocab: tuple[np.ndarray, np.ndarray] | None = None
        self._layers = _Lru(8)
        self._shards = _Lru(32)
        self._corpus_meta: dict[str, Any] | None = None

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: str | Path) -> Any:
        """Open an existing atlas (the query API reads; :class:`storage.store.Store` writes)."""
        p = str(path)
        if not location.exists(p):
            raise AtlasError(f"no atlas at {p} (no zarr.json): run `neuronmap run` first")
        try:
            root = open_root(p, cls.MODE)
        except Exception as e:  # zarr raises several types for unreadable stores
            raise AtlasError(f"cannot open atlas {p}: {e}") from e
        if root.attrs.get("schema_version") != SCHEMA_VERSION:
            raise AtlasError(
                f"{p} is not a neuronmap atlas of schema {SCHEMA_VERSION} "
                f"(found {root.attrs.get('schema_version')!r})"
            )
        return cls(root, p)

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether an atlas is at ``path`` (a directory or an object-store URL)."""
        return location.exists(path)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    # ------------------------------------------------------------------ corpus

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

    def _corpus_info(self) -> dict[str, Any]:
        """Corpus attrs and per-sequence sources, read once per handle."""
        if self._corpus_meta is None:
            c = self.corpus
            self._corpus_meta = {**dict(c.attrs), "sources": c["sources"][...]}
        return self._corpus_meta

    def _shard_rows(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and mask of one shard (one chunk each), cached."""
        return self._shards.get(shard, lambda: self.read_shard(shard))

    def sample_rows_per_shard(self) -> int:
        a = self.corpus.attrs
        if "sample_per_shard" in a:  # fixed when the corpus is written, kept as it grows
            return int(a["sample_per_shard"])
        n = self.corpus["sample_positions"].shape[0]
        return n // max(len(self.shard_ranges()), 1)

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

    # ------------------------------------------------------------------ manifest and runs

    def done(self, stage: str) -> dict[str, Any]:
        """Manifest entry of a stage: {"fingerprint", "shards": [...], "complete": bool}."""
        if MANIFEST not in self.root:
            return {}
        return dict(self.root[MANIFEST].attrs.get(stage, {}))

    def runs(self) -> list[dict[str, Any]]:
        """Every recorded run, latest last: ``{"run", "started", "finished", "stages": [...]}``,
        each stage with its tokens, forwards, seconds, tokens/s and workers."""
        if RUNS not in self.root:
            return []
        return list(self.root[RUNS].attrs.get("runs", []))

    # ------------------------------------------------------------------ models and families

    @property
    def models(self) -> list[str]:
        """Models mapped over this atlas's own corpus (see :attr:`all_models` for families)."""
        return sorted(self.root["models"].group_keys())

    @property
    def families(self) -> list[str]:
        if FAMILIES not in self.root:
            return []
        return sorted(self.root[FAMILIES].group_keys())

    def family(self, name: str) -> Any:
        """The nested atlas of a family, opened like this one (a store opens a store)."""
        if name not in self.families:
            raise AtlasError(f"family {name!r} is not in {self.path}; it has {self.families}")
        return type(self).open(family_path(self.path, name))

    @property
    def all_models(self) -> list[str]:
        return self.models + [m for f in self.families for m in self.family(f).models]

    def owner(self, model: str) -> Any:
        """The atlas (this one or a family) that holds ``model``."""
        if model in self.root["models"]:
            return self
        for f in self.families:
            fam = self.family(f)
            if model in fam.root["models"]:
                return fam
        raise AtlasError(f"model {model!r} is not in {self.path}; it has {self.all_models}")

    def _holders(self) -> list[Atlas]:
        return [self] + [self.family(f) for f in self.families]

    @routed
    def model_group(self, model: str) -> zarr.Group:
        return self.root["models"][model]

    @routed
    def model_attrs(self, model: str) -> dict[str, Any]:
        return dict(self.root["models"][model].attrs)

    def data_key(self, fingerprint: str) -> str:
        """A model's content key (``fingerprint``) joined with the extent of the corpus: the
        key of every result computed from the recorded data (dictionaries, universality),
        so that they are computed again once the corpus has grown."""
        return f"{fingerprint}@{int(self.corpus.attrs['n_sequences'])}"

    @routed
    def layers(self, model: str) -> list[int]:
        return sorted(int(k) for k in self.root["models"][model]["layers"].group_keys())

    @routed
    def layer_group(self, model: str, layer: int) -> zarr.Group:
        lg = self.root["models"][model]["layers"]
        if str(layer) not in lg:
            raise AtlasError(
                f"layer {layer} of model {model!r} is not in {self.path}; "
                f"recorded layers: {self.layers(model)}"
            )
        return lg[str(layer)]

    @routed
    def sample(self, model: str, layer: int, shards: Iterable[int] | None = None
               ) -> list[tuple[int, np.ndarray, np.ndarray]]:  # fmt: skip
        """The stored activation sample of a layer by shard: ``(shard, activations [T_s, d]
        float32, flat corpus positions [T_s])`` for every shard that has sample rows, or for
        those of ``shards`` (only their rows are read: a worker holding some shards does not
        load the whole sample)."""
        arr = self.layer_group(model, layer)["sample"]
        pos = self.corpus["sample_positions"][...]
        per = self.sample_rows_per_shard()
        want = range(len(self.shard_ranges())) if shards is None else sorted(set(shards))
        out = []
        for s in want:
            p = pos[s * per : (s + 1) * per]
            ok = p >= 0
            if ok.any():
                out.append((s, arr[s * per : (s + 1) * per][ok].astype(np.float32), p[ok]))
        return out

    def sample_counts(self) -> dict[int, int]:
        """Sample rows of every shard that has some (the same for every sampled layer)."""
        pos = self.corpus["sample_positions"][...]
        per = self.sample_rows_per_shard()
        n = len(self.shard_ranges())
        counts = (pos[: n * per].reshape(n, per) >= 0).sum(1) if per else np.zeros(0, np.int64)
        return {int(s): int(c) for s, c in enumerate(counts) if c}

    # ------------------------------------------------------------------ neurons

    @routed
    def stats(self, model: str, layer: int) -> dict[str, np.ndarray]:
        """All per-neuron statistics of one layer (small arrays, read whole; read-only)."""
        return dict(self._layer_data(model, layer)["stats"])

    def _layer_data(self, model: str, layer: int) -> dict[str, dict[str, np.ndarray]]:
        """Every per-neuron array of a finished layer (stats, top-k, props), read whole
        once per handle: small next to the model, and a neuron page then reads nothing."""

        def load() -> dict[str, dict[str, np.ndarray]]:
            L = self.layer_group(model, layer)
            out = {g: {k: L[g][k][...] for k in self._array_names(L[g])}
                   for g in ("stats", "topk", "props", TAXONOMY) if g in L}  # fmt: skip
            for arrays in out.values():
                for a in arrays.values():
                    a.flags.writeable = False  # shared by every caller of this handle
            return out

        return self._layers.get((model, layer), load)

    def _array_names(self, group: zarr.Group) -> list[str]:
        """The arrays of a group, refusing a group that lost one it records (``arrays``)."""
        have = sorted(group.array_keys())
        gone = sorted(set(group.attrs.get(ARRAYS, [])) - set(have))
        if gone:
            raise ChunkError(f"array {group.path}/{gone[0]} of {self.path} is missing: the atlas "
                             f"is damaged (`neuronmap verify {self.path}`)")  # fmt: skip
        return have

    @routed
    def taxonomy(self, model: str, layer: int) -> dict[str, np.ndarray]:
        """A finished layer's taxonomy arrays (``{}`` when the job did not count them)."""
        return dict(self._layer_data(model, layer).get(TAXONOMY, {}))

    @routed
    def taxonomy_attrs(self, model: str, layer: int) -> dict[str, Any]:
        L = self.layer_group(model, layer)
        return dict(L[TAXONOMY].attrs) if TAXONOMY in L else {}

    @routed
    def props(self, model: str, layer: int) -> dict[str, np.ndarray]:
        return dict(self._layer_data(model, layer).get("props", {}))

    @routed
    def neuron(self, model: str, layer: int, index: int, k: int | None = None,
               context: int = 12) -> NeuronRecord:  # fmt: skip
        """Statistics and top-``k`` examples of one neuron, decoded with the atlas vocabulary."""
        self._require_complete(model)
        data = self._layer_data(model, layer)
        st = data["stats"]
        d = st["mean"].shape[0]
        if not 0 <= index < d:
            raise AtlasError(f"neuron index {index} out of range: layer {layer} has {d} neurons")
        stats: dict[str, Any] = {}
        for name in STAT_NAMES:
            if name != "hist":
                stats[name] = np.asarray(st[name][index]).item()
        stats["hist"] = st["hist"][index].tolist()
        stats["hist_edges"] = st["hist_edges"].tolist()
        props = {}
        for name, arr in data.get("props", {}).items():
            v = arr[index]
            props[name] = v.tolist() if np.ndim(v) else np.asarray(v).item()
        for key in ("top_promoted", "top_suppressed"):
            if key in props:
                props[key + "_tokens"] = [self.decode([t]) for t in props[key]]
        stats["props"] = props
        values = data["topk"]["values"][index]
        positions = data["topk"]["positions"][index]
        if k is not None:
            values, positions = values[:k], positions[:k]
        return NeuronRecord(model, layer, index, stats, self._examples(values, positions, context))

    def _examples(self, values: np.ndarray, positions: np.ndarray, context: int) -> list[Example]:
        return [self._example(r, float(v), int(p), context)
                for r, (v, p) in enumerate(zip(values, positions, strict=True)) if p >= 0]  # fmt: skip

    def _example(self, rank: int, value: float, position: int, context: int) -> Example:
        c = self._corpus_info()
        seq_len = c["seq_len"]
        seq, t = divmod(position, seq_len)
        lo = max(0, t - context)
        hi = t + 1 + max(context // 3, 2)
        shard, row = divmod(seq, c["shard_sequences"])
        tokens, mask = self._shard_rows(shard)
        toks = tokens[row, lo:hi]
        keep = mask[row, lo:hi]  # drops BOS and padding from the shown context
        j = t - lo
        left = self.token_bytes(int(x) for x, ok in zip(toks[:j], keep[:j], strict=True) if ok)
        tok = self.token_bytes([int(toks[j])])
        right = self.token_bytes(
            int(x) for x, ok in zip(toks[j + 1 :], keep[j + 1 :], strict=True) if ok
        )
        names = c["source_names"]
        src = names[int(c["sources"][seq])] if names else ""
        text = mark_token(left, tok, right)
        return Example(rank, value, position, seq, t, tok.decode("utf-8", "replace"), text, src)

    # ------------------------------------------------------------------ taxonomy

    def _kind_names(self, model: str, layer: int) -> tuple[list[str], dict[str, str]]:
        """The kinds a layer was labelled with and the score each is ranked by, as the
        labelling wrote them (``ops.configs.TAXONOMY_KINDS``, ``TAXONOMY_SCORES``) into the layer's attrs."""
        a = self.taxonomy_attrs(model, layer)
        return list(a.get("kinds", [])), dict(a.get("scores", {}))

    def _taxonomy_layers(self, model: str, layer: int | None) -> list[int]:
        self._require_complete(model)
        layers = self.layers(model) if layer is None else [layer]
        if layer is not None and layer not in self.layers(model):
            raise AtlasError(f"layer {layer} of {model!r} is not in {self.path} "
                             f"(recorded: {self.layers(model)})")  # fmt: skip
        if not all(self.taxonomy(model, L).get("kind_dead") is not None for L in layers):
            raise AtlasError(f"{self.path} has no taxonomy for {model!r} (the job ran with "
                             "'record.taxonomy: null'; map it again with the default)")  # fmt: skip
        return layers

    def _token_texts(self, items: np.ndarray, counts: np.ndarray, base: int | None,
                     n: int) -> list[dict[str, Any]]:  # fmt: skip
        out = []
        for it, c in zip(items[:n], counts[:n], strict=True):
            if it < 0 or c <= 0:
                break
            text = (self.decode([int(it)]) if base is None
                    else self.decode([int(it) // base]) + self.decode([int(it) % base]))  # fmt: skip
            out.append({"text": text, "count": int(c)})
        return out

    @routed
    def neurons(self, model: str, layer: int | None = None, kind: str | None = None,
                source: str | None = None, top: int = 20) -> list[dict[str, Any]]:  # fmt: skip
        """Neurons of one kind (``kinds`` attr of the layer), strongest first: ``{"layer", "index", "kind",
        "score", ...}`` with the top trigger ``tokens`` (token and n-gram kinds, most
        frequent first), the firing rate per position bucket (``positions``), the favoured
        ``source`` and per-source rates. ``kind=None``: every kind, ``top`` of each.
        ``source`` keeps the neurons whose favoured source it is (any kind)."""
        layers = self._taxonomy_layers(model, layer)
        known, score_of = self._kind_names(model, layers[0])
        if kind is not None and kind not in known:
            raise AtlasError(f"unknown kind {kind!r}; kinds: {', '.join(known)}")
        kinds = [kind] if kind else known
        names = self.taxonomy_attrs(model, layers[0]).get("sources", [])
        if source is not None and source not in names:
            raise AtlasError(f"unknown source {source!r}; sources of {self.path}: {names}")
        rows: list[dict[str, Any]] = []
        for k in kinds:
            cands = []
            for L in layers:
                t, st = self.taxonomy(model, L), self._layer_data(model, L)["stats"]
                sel = t[f"kind_{k}"].copy()
                if source is not None:
                    sel &= t["source_favoured"] == names.index(source)
                for i in np.flatnonzero(sel):
                    score = (float(t[score_of[k]][i]) if k in score_of
                             else float(max(abs(st["max"][i]), abs(st["min"][i]))) if k == "massive"
                             else 1.0 - float(t["fire_rate"][i]))  # fmt: skip
                    cands.append((-score, L, int(i), score))
            for _, L, i, score in sorted(cands)[:top]:
                rows.append(self._taxonomy_record(model, L, i, k, score, names))
        return rows

    def _taxonomy_record(self, model: str, layer: int, i: int, kind: str, score: float,
                         names: list[str]) -> dict[str, Any]:  # fmt: skip
        t = self.taxonomy(model, layer)
        attrs = self.taxonomy_attrs(model, layer)
        rec: dict[str, Any] = {
            "model": model, "layer": layer, "index": i, "kind": kind, "score": score,
            "kinds": [k for k in self._kind_names(model, layer)[0] if t[f"kind_{k}"][i]],
            "fire_rate": float(t["fire_rate"][i]), "fires": int(t["fires"][i]),
            "threshold": float(t["threshold"][i]),
        }  # fmt: skip
        base = int(attrs["bigram_base"])
        toks = self._token_texts(t["tok_items"][i], t["tok_counts"][i], None, 5)
        grams = self._token_texts(t["bi_items"][i], t["bi_counts"][i], base, 5)
        top = grams if kind == "ngram" else toks  # `tokens`: what the kind fires on
        rec["tokens"] = [x["text"] for x in top]
        rec["counts"] = [x["count"] for x in top]
        rec["exact"] = bool(t["bi_err" if kind == "ngram" else "tok_err"][i] == 0)
        rec["bigrams"] = [x["text"] for x in grams]
        props = self.props(model, layer)
        if "top_suppressed" in props and toks:
            # the seed paper's weight view: does W_out remove the trigger from the stream?
            rec["suppresses_trigger"] = bool(
                int(t["tok_items"][i][0]) in props["top_suppressed"][i]
            )
        rec["positions"] = [float(x) for x in t["pos_rate"][i]]
        rec["source"] = names[int(t["source_favoured"][i])] if names else None
        rec["source_rates"] = {
            n: float(r) for n, r in zip(names, t["source_rate"][i], strict=False)
        }
        return rec

    @routed
    def neuron_kinds(self, model: str, layer: int, index: int) -> dict[str, Any] | None:
        """One neuron's taxonomy record (as :meth:`neurons` gives it, ``kind`` its first
        kind), or None when the job counted nothing."""
        t = self.taxonomy(model, layer)
        if "kind_dead" not in t:
            return None
        known, score_of = self._kind_names(model, layer)
        kinds = [k for k in known if t[f"kind_{k}"][index]]
        kind = kinds[0] if kinds else None
        score = float(t[score_of[kind]][index]) if kind in score_of else None
        names = self.taxonomy_attrs(model, layer).get("sources", [])
        rec = self._taxonomy_record(model, layer, index, kind or "", score or 0.0, names)
        rec["kind"], rec["score"] = kind, score
        rec["pos_mean"] = [float(x) for x in t["pos_mean"][index]] if "pos_mean" in t else None
        return rec

    def search_token(self, text: str, model: str | None = None, top: int = 20
                     ) -> list[dict[str, Any]]:  # fmt: skip
        """Neurons that fire on the token ``text`` (its exact text, e.g. ``" Paris"``), by
        the share of their fires it takes: ``{"model", "layer", "index", "share", "count",
        "fires", "token"}``."""
        blob, off = self._vocab_arrays()
        want = text.encode()
        ids = [i for i in range(len(off) - 1) if blob[off[i] : off[i + 1]].tobytes() == want]
        if not ids:
            raise AtlasError(f"no token of the vocabulary reads {text!r} (mind the leading "
                             "space of word tokens, e.g. ' Paris')")  # fmt: skip
        rows = []
        for m in [model] if model else self.all_models:
            at = self.owner(m)
            if not at.model_attrs(m).get("complete"):
                continue
            for L in at.layers(m):
                lg = at.layer_group(m, L)
                if TAXONOMY not in lg or "tok_items" not in lg[TAXONOMY]:
                    continue
                g = lg[TAXONOMY]  # three arrays, not the layer's whole data
                t = {k: g[k][...] for k in ("tok_items", "tok_counts", "fires")}
                hit = np.isin(t["tok_items"], ids)
                for i, j in zip(*np.nonzero(hit), strict=True):
                    c, f = int(t["tok_counts"][i, j]), int(t["fires"][i])
                    rows.append({"model": m, "layer": L, "index": int(i), "count": c, "fires": f,
                                 "share": c / max(f, 1), "token": text})  # fmt: skip
        rows.sort(key=lambda r: (-r["share"], -r["count"], r["model"], r["layer"], r["index"]))
        return rows[:top]

    def neuron_links(self, model: str, layer: int, index: int, features: int = 5
                     ) -> dict[str, Any]:  # fmt: skip
        """What links to a neuron: its best partner in every other model compared with it
        (r and the rotation baseline) and the dictionary features of its layer that load on
        it most (by |weight| of the feature's direction on the neuron)."""
        partners = []
        for a, b in self.universality_pairs():
            if a != model:
                continue
            g = self._pair_group(a, b)
            rows = list(g.attrs.get("layers", []))
            if layer not in rows:
                continue
            r = rows.index(layer)
            partners.append({"model": b, "layer": int(g["partner_layer"][r, index]),
                             "index": int(g["partner_index"][r, index]),
                             "corr": float(g["max_corr"][r, index]),
                             "baseline": float(g["baseline_max_corr"][r, index])})  # fmt: skip
        feats = []
        at = self.owner(model)
        for method, runs in at.dictionaries(model, layer).items():
            for run in runs:
                # a dictionary's directions are read once per handle, not once per neuron page
                dirs = at._layers.get(("directions", model, layer, method, run), lambda m=method, r=run:
                                      self.feature_directions(at.dictionary(model, layer, m, r), m))  # fmt: skip
                w = dirs[:, index]
                for f in np.argsort(-np.abs(w), kind="stable")[:features]:
                    feats.append({"method": method, "run": run, "index": int(f),
                                  "weight": float(w[f])})  # fmt: skip
        return {"partners": partners, "features": feats}

    @routed
    def layer_kinds(self, model: str) -> list[dict[str, Any]]:
        """Per layer, the fraction of neurons of each kind (a neuron may have several)."""
        out = []
        self._require_complete(model)
        for L in self.layers(model):
            lg = self.layer_group(model, L)
            if TAXONOMY not in lg or "kind_dead" not in lg[TAXONOMY]:
                raise AtlasError(f"{self.path} has no taxonomy for {model!r} (the job ran with "
                                 "'record.taxonomy: null'; map it again with the default)")  # fmt: skip
            names = lg[TAXONOMY].attrs.get("kinds", [])
            kinds = {k: lg[TAXONOMY][f"kind_{k}"][...] for k in names}  # the labels only
            out.append({"layer": L, "neurons": int(len(kinds["dead"])),
                        **{k: float(v.mean()) for k, v in kinds.items()}})  # fmt: skip
        return out

    def _require_complete(self, model: str) -> None:
        if not self.model_attrs(model).get("complete"):
            raise AtlasError(
                f"model {model!r} in {self.path} is not complete yet; "
                "finish it with `neuronmap run --resume`"
            )

    # ------------------------------------------------------------------ dictionaries

    @routed
    def dictionaries(self, model: str, layer: int) -> dict[str, list[str]]:
        lg = self.layer_group(model, layer)
        return {m: sorted(lg[m].group_keys()) for m in METHODS if m in lg}

    @routed
    def dictionary(self, model: str, layer: int, method: str, run: str | None = None):
        """The run's Zarr group (the only run of that method when ``run`` is None)."""
        runs = self.dictionaries(model, layer).get(method, [])
        if not runs:
            raise AtlasError(f"no {method} runs for {model!r} layer {layer} in {self.path}")
        if run is None:
            if len(runs) > 1:
                raise AtlasError(f"several {method} runs ({runs}); pick one with --run")
            run = runs[0]
        if run not in runs:
            raise AtlasError(f"{method} run {run!r} not found; runs: {runs}")
        return self.layer_group(model, layer)[method][run]

    @staticmethod
    def feature_directions(g: zarr.Group, method: str) -> np.ndarray:
        """Feature directions in neuron space, [n_features, d_mlp]."""
        return g["W_dec"][...] if method == "sae" else g["Z"][...].T

    @routed
    def dictionary_overview(self, model: str) -> dict[int, dict[str, Any]]:
        """Per layer: every run's metrics (``"<method>/<run>"``) and the steering result count."""
        out: dict[int, dict[str, Any]] = {}
        for layer in self.layers(model):
            g = self.layer_group(model, layer)
            runs = {f"{m}/{r}": dict(g[m][r].attrs.get("metrics", {}))
                    for m in METHODS if m in g for r in sorted(g[m].group_keys())}  # fmt: skip
            n_steer = len(g["steering"].attrs.get("results", {})) if "steering" in g else 0
            if runs or n_steer:
                out[layer] = {"runs": runs, "steering": n_steer}
        return out

    @routed
    def feature(self, model: str, layer: int, method: str, index: int, run: str | None = None,
                k: int | None = 10, neurons: int = 8, context: int = 12) -> FeatureRecord:  # fmt: skip
        g = self.dictionary(model, layer, method, run)
        n = g["stats"]["mean"].shape[0]
        if not 0 <= index < n:
            raise AtlasError(f"feature index {index} out of range: the run has {n} features")
        stats = {name: np.asarray(g["stats"][name][index]).item()
                 for name in g["stats"].array_keys() if name not in ("hist", "hist_edges")}  # fmt: skip
        direction = self.feature_directions(g, method)[index]
        order = np.argsort(-np.abs(direction), kind="stable")[:neurons]
        strongest = [(int(i), float(direction[i])) for i in order if direction[i] != 0]
        vals, pos = g["topk"]["values"][index], g["topk"]["positions"][index]
        if k is not None:
            vals, pos = vals[:k], pos[:k]
        promoted = [self.decode([int(t)]) for t in g["promoted"][index]] if "promoted" in g else []
        suppressed = (
            [self.decode([int(t)]) for t in g["suppressed"][index]] if "suppressed" in g else []
        )
        steering = self.steering(model, layer).get(steering_key(method, g.basename, index))
        return FeatureRecord(model, layer, method, g.basename, index, stats,
                             self._examples(vals, pos, context), strongest, promoted, suppressed,
                             steering)  # fmt: skip

    @routed
    def steering(self, model: str, layer: int) -> dict[str, SteeringRecord]:
        """Every stored steering result of a layer, by key (empty when none)."""
        lg = self.layer_group(model, layer)
        if "steering" not in lg:
            return {}
        out = {}
        for key, r in lg["steering"].attrs.get("results", {}).items():
            out[key] = SteeringRecord(
                key, r["alpha"], r["alpha_rel"], r["kl"], r["target_kl"], r["converged"],
                [(self.decode([int(t)]), float(v)) for t, v in r["promoted"]],
                [(self.decode([int(t)]), float(v)) for t, v in r["suppressed"]],
                [(float(a), float(k)) for a, k in r["evaluations"]],
            )  # fmt: skip
        return out

    @routed
    def steering_direction(self, model: str, layer: int, key: str) -> np.ndarray:
        """A stored baseline direction (``contrast_key(a, b)``)."""
        lg = self.layer_group(model, layer)
        name = key.replace("/", "__")
        if "steering" not in lg or name not in lg["steering"]:
            raise AtlasError(f"no stored direction {key!r} for {model!r} layer {layer}")
        return lg["steering"][name][...]

    # ------------------------------------------------------------------ universality

    def _uni(self) -> zarr.Group | None:
        return self.root.get(UNIVERSALITY)

    def universality_pairs(self) -> list[tuple[str, str]]:
        out = []
        for at in self._holders():
            u = at._uni()
            if u is not None:
                out += [tuple(k.split("--", 1)) for k in u.group_keys() if "--" in k]
        return sorted(out)

    def _pair_group(self, a: str, b: str) -> zarr.Group | None:
        for at in self._holders():
            u = at._uni()
            if u is not None and pair_key(a, b) in u:
                return u[pair_key(a, b)]
        return None

    def pair(self, a: str, b: str) -> dict[str, np.ndarray]:
        """Best partner in ``b`` of every neuron of ``a`` (arrays [n_layers_a, d_mlp_a])."""
        g = self._pair_group(a, b)
        if g is None:
            raise AtlasError(f"no universality results for {a!r} vs {b!r} in {self.path}; "
                             f"pairs: {self.universality_pairs()}")  # fmt: skip
        return {k: g[k][...] for k in g.array_keys()} | {"attrs": dict(g.attrs)}

    def matching(self, a: str, b: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """One-to-one neuron matching of layer ``layer`` of ``a`` onto ``b``: (perm, corr)."""
        g = self._pair_group(a, b)
        if g is None or "matching" not in g:
            raise AtlasError(f"no matching for {a!r} vs {b!r} in {self.path}")
        return g["matching"]["perm"][layer], g["matching"]["corr"][layer]

    def universality_summary(self, model: str) -> dict[int, dict[str, np.ndarray]]:
        """Per layer: mean/max/min best-partner correlation, baseline, excess, universal."""
        for at in self._holders():
            u = at._uni()
            if u is not None and "summary" in u and model in u["summary"]:
                g = u["summary"][model]
                return {int(L): {k: g[L][k][...] for k in g[L].array_keys()}
                        for L in sorted(g.group_keys(), key=int)}  # fmt: skip
        raise AtlasError(f"no universality summary for model {model!r} in {self.path}")

    def summarised_models(self) -> list[str]:
        out = []
        for at in self._holders():
            u = at._uni()
            if u is not None and "summary" in u:
                out += sorted(u["summary"].group_keys())
        return out

    def universal_neurons(self, model: str | None = None, top: int = 20,
                          examples: int = 3) -> list[dict[str, Any]]:  # fmt: skip
        """Universal neurons by excess correlation, with their partners and top examples."""
        models = [model] if model else self.summarised_models()
        rows = []
        for m in models:
            for layer, s in self.universality_summary(m).items():
                for i in np.flatnonzero(s["universal"]):
                    rows.append({"model": m, "layer": layer, "index": int(i),
                                 "excess_corr": float(s["excess_corr"][i]),
                                 "mean_max_corr": float(s["mean_max_corr"][i]),
                                 "baseline": float(s["baseline"][i])})  # fmt: skip
        rows.sort(key=lambda r: (-r["excess_corr"], r["model"], r["layer"], r["index"]))
        rows = rows[:top]
        pairs = self.universality_pairs()
        for r in rows:
            r["partners"] = []
            for a, b in pairs:
                if a == r["model"]:
                    p = self.pair(a, b)
                    L, i = r["layer"], r["index"]
                    r["partners"].append({"model": b, "layer": int(p["partner_layer"][L, i]),
                                          "index": int(p["partner_index"][L, i]),
                                          "corr": float(p["max_corr"][L, i])})  # fmt: skip
            rec = self.neuron(r["model"], r["layer"], r["index"], k=examples)
            r["examples"] = [e.text for e in rec.examples]
        return rows

    def universality_study(self) -> dict[str, Any]:
        """The study-wide summary of the comparison (universal fraction, mean best-partner r,
        rotation baseline, tokens, universal vs non-universal comparison), from this atlas
        or the family that holds it; empty when there is none. The CLI and the viewer show
        the same one."""
        for holder in [self] + [self.family(f) for f in self.families]:
            if "universality" in holder.attrs:
                return dict(holder.attrs["universality"])
        return {}

    def universality_overview(self) -> dict[str, Any]:
        """Universal fraction per model and layer, with mean excess and baseline."""
        out: dict[str, Any] = {}
        for m in self.summarised_models():
            per = {}
            for layer, s in self.universality_summary(m).items():
                per[layer] = {"universal_frac": float(s["universal"].mean()),
                              "mean_max_corr": float(s["mean_max_corr"].mean()),
                              "baseline": float(s["baseline"].mean()),
                              "dead_frac": float(s["dead"].mean())}  # fmt: skip
            out[m] = per
        return out

    # ------------------------------------------------------------------ summary

    def _wants_props(self) -> bool:
        return bool(self.attrs.get("job", {}).get("record", {}).get("properties", False))

    def pending(self) -> list[str]:
        """Stages started but not finished (from the manifest), families included; a model
        whose weight properties were asked for but are missing counts as ``properties/<m>``."""
        out = []
        for at in self._holders():
            if MANIFEST in at.root:
                out += [k for k, v in at.root[MANIFEST].attrs.items() if not v.get("complete")]
            if at._wants_props():
                out += [f"properties/{m}" for m in at.models
                        if not at.model_attrs(m).get("props_complete")]  # fmt: skip
        return sorted(set(out))

    def info(self) -> dict[str, Any]:
        """Summary of the atlas for ``neuronmap info``."""
        a = self.attrs
        out: dict[str, Any] = {
            "path": self.path,
            "complete": False,  # below: finished, and nothing started since is pending
            "pending": self.pending(),
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
                    st = self.layer_group(m, layer)["stats"]
                    layers[layer] = {
                        "dead_frac": float(st["dead"][...].mean()),
                        "massive": int(st["massive"][...].sum()),
                        "mean_frac_active": float(np.nanmean(st["frac_active"][...])),
                    }
            keys = ("source", "architecture", "n_layers", "d_mlp", "hook_site", "dtype",
                    "compute_dtype", "complete", "tokens_per_second")  # fmt: skip
            out["models"][m] = {k: ma.get(k) for k in keys} | {"layers": layers}
            if self._wants_props() and not ma.get("props_complete"):
                out["models"][m]["complete"] = False  # statistics alone are not the model
            dicts = self.dictionary_overview(m)
            if dicts:
                out["models"][m]["dictionaries"] = dicts
        out["complete"] = bool(a.get("complete")) and not out["pending"]
        if self.families:
            out["families"] = {f: self.family(f).info() for f in self.families}
        if UNIVERSALITY in self.root:
            out["universality"] = self.universality_overview()
        out["runs"] = self.runs()
        return out
