"""The atlas layout: schema version and every name that places something in the atlas.

    attrs: schema_version, job, code_version, tokenizer, created, updated, universality
    corpus/tokens [n_seq, seq_len] int32, doc_ids [n_seq], sources [n_seq], mask [n_seq, seq_len]
    corpus/vocab_bytes, corpus/vocab_offsets       token id -> raw bytes (decoding without models)
    corpus/sample_positions [n_sample]             flat positions of the activation sample
    models/<m>/layers/<L>/stats/{count,mean,var,skew,kurt,min,max,frac_active,hist,hist_edges,
                                 dead,massive}
    models/<m>/layers/<L>/topk/{values,positions}  [d_mlp, k]; positions index corpus/tokens.flat
    models/<m>/layers/<L>/sample [n_sample, d_mlp] float16 (optional)
    models/<m>/layers/<L>/props/...                weight-derived neuron properties
    models/<m>/layers/<L>/{sae,snmf}/<run>/{weights..., stats/, topk/} + attrs (config, metrics)
    models/<m>/layers/<L>/steering                 attrs["results"] by key; baseline directions
    universality/<A>--<B>/{partner_layer, partner_index, max_corr, min_corr, baseline_max_corr,
                           matching/{perm, corr}, corr (keep_full only)}
    universality/summary/<model>/<L>/{mean_max_corr, ..., universal, dead}
    families/<name>/                               a complete nested atlas (own tokenizer)
    _work/<key>/shard_<i>/...                      per-shard partials, removed after the merge
    _manifest (attrs)                              which shards of which stage are complete
    _runs (attrs)                                  run accounting, latest last
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

METHODS = ("sae", "snmf")
"""Dictionary methods, each a group under a layer."""

PAIR_ARRAYS = ("partner_layer", "partner_index", "max_corr", "min_corr", "baseline_max_corr")
SUMMARY_ARRAYS = ("mean_max_corr", "max_max_corr", "min_max_corr", "baseline", "excess_corr",
                  "universal", "dead")  # fmt: skip

WORK, MANIFEST, RUNS, FAMILIES, UNIVERSALITY = "_work", "_manifest", "_runs", "families", "universality"


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
