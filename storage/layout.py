"""The atlas layout: schema version and every name that places something in the atlas.

    attrs: schema_version, integrity, job, code_version, tokenizer, created, updated,
           complete (the whole job finished), finished_run, universality
    corpus/tokens [n_seq, seq_len] int32, doc_ids [n_seq], sources [n_seq], mask [n_seq, seq_len]
    corpus/vocab_bytes, corpus/vocab_offsets       token id -> raw bytes (decoding without models)
    corpus/sample_positions [n_sample]             flat positions of the activation sample
    models/<m>/layers/<L>/stats/{count,mean,var,skew,kurt,min,max,frac_active,hist,hist_edges,
                                 dead,massive}
    models/<m>/layers/<L>/topk/{values,positions}  [d_mlp, k]; positions index corpus/tokens.flat
    models/<m>/layers/<L>/sample [n_sample, d_mlp] float16 (optional)
    models/<m>/layers/<L>/props/...                weight-derived neuron properties
    models/<m>/layers/<L>/taxonomy/{threshold, fires, scores..., kind_<k>, tok_items/counts,
                                    bi_items/counts, pos_rate, source_rate, source_mean}
                                                   + attrs (firing rule, tokens, sources, buckets)
    models/<m>/layers/<L>/{sae,snmf}/<run>/{weights..., stats/, topk/} + attrs (config, metrics)
    models/<m>/layers/<L>/steering                 attrs["results"] by key; baseline directions
    universality/<A>--<B>/{partner_layer, partner_index, max_corr, min_corr, baseline_max_corr,
                           matching/{perm, corr}, corr (keep_full only)}
    universality/summary/<model>/<L>/{mean_max_corr, ..., universal, dead}
    families/<name>/                               a complete nested atlas (own tokenizer)
    _work/<key>/shard_<i>/...                      per-shard partials, removed after the merge
    _state/record/<m>/ckpt-<i>/...                 merged statistics of the corpus's whole shards
                                                   (kept: a grown corpus continues from them)
    _manifest (attrs)                              which shards of which stage are complete
    _runs (attrs)                                  run accounting, latest last

Every array carries ``dimension_names`` (:data:`DIMS`) and a ``description`` attr where it
has a fixed meaning (:data:`ABOUT`), so xarray or plain zarr can read the atlas without
neuronmap. Every chunk ends with its crc32c and every chunk of the grid is stored
(``storage.integrity``); ``neuronmap verify ATLAS`` checks both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.errors import AtlasError

SCHEMA_VERSION = 1

STAT_NAMES = ("count", "mean", "var", "skew", "kurt", "min", "max", "frac_active", "hist",
              "dead", "massive")  # fmt: skip
STAT_DTYPES = {"count": "int64", "hist": "int64", "dead": "bool", "massive": "bool",
               "min": "float32", "max": "float32"}  # fmt: skip
"""dtype of each neuron statistic (float64 when not listed)."""

TAXONOMY = "taxonomy"
"""Per-layer group of the neuron taxonomy (``ops.taxonomy``)."""

METHODS = ("sae", "snmf")
"""Dictionary methods, each a group under a layer."""

PAIR_ARRAYS = ("partner_layer", "partner_index", "max_corr", "min_corr", "baseline_max_corr")
SUMMARY_ARRAYS = ("mean_max_corr", "max_max_corr", "min_max_corr", "baseline", "excess_corr",
                  "universal", "dead")  # fmt: skip

WORK, MANIFEST, RUNS, FAMILIES, UNIVERSALITY = "_work", "_manifest", "_runs", "families", "universality"
STATE = "_state"
"""Mergeable state a finished job keeps (``_work`` is dropped): what a grown corpus continues."""


DIMS: dict[str, tuple[str, ...]] = {
    "tokens": ("sequence", "position"), "mask": ("sequence", "position"),
    "doc_ids": ("sequence",), "sources": ("sequence",), "vocab_bytes": ("byte",),
    "vocab_offsets": ("token_id_edge",), "sample_positions": ("sample",),
    "hist": ("{unit}", "bin"), "hist_edges": ("bin_edge",), "sample": ("sample", "neuron"),
    "values": ("{unit}", "rank"), "positions": ("{unit}", "rank"),
    "W_enc": ("neuron", "feature"), "W_dec": ("feature", "neuron"), "b_enc": ("feature",),
    "b_dec": ("neuron",), "Z": ("neuron", "feature"),
    "promoted": ("feature", "rank"), "suppressed": ("feature", "rank"),
    "top_promoted": ("neuron", "rank"), "top_suppressed": ("neuron", "rank"),
    "perm": ("layer", "neuron"), "corr": ("layer", "neuron"),
    "pos_rate": ("neuron", "position_bucket"), "pos_tokens": ("position_bucket",),
    "source_rate": ("neuron", "source"), "source_mean": ("neuron", "source"),
    "src_tokens": ("source",), "tok_items": ("neuron", "rank"), "tok_counts": ("neuron", "rank"),
    "bi_items": ("neuron", "rank"), "bi_counts": ("neuron", "rank"),
    **{name: ("layer", "neuron") for name in PAIR_ARRAYS},
}  # fmt: skip
"""Dimension names of arrays by name (``{unit}`` is ``neuron`` or ``feature``); any other
array is indexed by its unit first (see :func:`dims`)."""

ABOUT = {
    "tokens": "token ids; row = sequence, BOS first", "mask": "true where a token counts",
    "doc_ids": "source document of each sequence", "sources": "index into attrs source_names",
    "vocab_bytes": "token bytes, concatenated", "vocab_offsets": "token id i is bytes[off[i]:off[i+1]]",
    "sample_positions": "flat positions (into tokens) of the activation sample, -1 unused",
    "count": "tokens seen", "mean": "mean activation", "var": "variance", "skew": "skewness",
    "kurt": "kurtosis", "min": "minimum", "max": "maximum",
    "frac_active": "fraction of tokens above the activity threshold",
    "hist": "histogram counts over hist_edges", "hist_edges": "histogram bin edges",
    "dead": "never above the dead-frequency threshold", "massive": "massive activation",
    "values": "top-k activations, largest first", "positions": "flat corpus positions of values",
    "sample": "activations at sample_positions (float16)",
}  # fmt: skip
"""Short description stored as the ``description`` attr of arrays with these names."""


def dims(name: str, ndim: int, unit: str = "neuron") -> tuple[str, ...]:
    """Dimension names of array ``name`` of rank ``ndim`` (xarray reads them from Zarr v3)."""
    d = tuple(x.format(unit=unit) for x in DIMS.get(name, ()))
    if len(d) != ndim:
        d = ((unit,) + tuple(f"{name}_{i}" for i in range(1, ndim)))[:ndim]
    return d


def fill(dtype: str) -> Any:
    """Fill value of an unwritten region: NaN, -1 or False, never a plausible value."""
    return {"bool": False}.get(dtype, -1 if dtype.startswith("int") else float("nan"))


def family_path(path: str | Path, name: str) -> str:
    return f"{str(path).rstrip('/')}/{FAMILIES}/{name}"


def partial_name(shard: int) -> str:
    return f"shard_{shard:06d}"


def pair_key(a: str, b: str) -> str:
    return f"{a}--{b}"


def _key_part(name: str) -> str:
    if not name or "/" in name:
        raise AtlasError(f"steering: {name!r} cannot be part of a key (empty or contains '/')")
    return name


def steering_key(method: str, run: str, feature: int) -> str:
    """Key of a dictionary feature's steering result."""
    return f"{method}/{_key_part(run)}/{int(feature)}"


def contrast_key(a: str, b: str) -> str:
    """Key of the difference-in-means baseline between corpus sources ``a`` and ``b``."""
    return f"diffmeans/{_key_part(a)}-vs-{_key_part(b)}"
