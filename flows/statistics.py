"""The merge every recording stage ends with: a model's shard partials folded in shard order
into its statistics, top-k examples and taxonomy (``record_merge``), and its recording speed
(``note_speed``). The record stage (``flows.record``) and a family's first universality pass
(``flows.universality``) both record neuron statistics; this module is theirs, so neither
stage imports the other.
"""

from __future__ import annotations

import json

import numpy as np
from prefect import get_run_logger
from tqdm.auto import tqdm

from flows.config import JobConfig, ModelConfig
from flows.taxonomy import PREFIX, read_counters, write_labels
from ops.stats import StatsPartial, finalize, merge_partials
from ops.taxonomy import CountersPartial, merge_counters
from storage.layout import STATE
from storage.store import Store


def record_merge(job: JobConfig, model: ModelConfig, prep: dict, atlas: Store) -> dict:
    """Fold the shard partials in shard order (deterministic), write stats and top-k.

    The fold over the corpus's whole shards is kept in ``_state`` (a finished job drops its
    partials): when the corpus grows, the fold continues from it over the shards recorded
    since, which gives the same statistics as a fold over every shard from the start."""
    n_shards = len(atlas.shard_ranges())
    whole = int(atlas.corpus.attrs["n_sequences"]) // int(atlas.corpus.attrs["shard_sequences"])
    n_sources = len(atlas.corpus.attrs["source_names"])
    key = f"record/{model.name}"
    acc: StatsPartial | None = None
    counts: CountersPartial | None = None
    start = 0
    kept = atlas.read_checkpoint(key, under=STATE)
    if kept is not None and kept[0].get("fingerprint") is not None:
        arrays, cursor = kept
        fp = bytes(arrays.pop("fingerprint")).decode()
        if fp == prep["fingerprint"] and 0 < cursor <= whole:
            acc, start = StatsPartial.from_arrays(arrays), cursor
            counts = read_counters(arrays, n_sources)
    # the dtype each shard was recorded in, and why (workers on GPUs and CPUs may differ)
    dtypes = dict(atlas.model_attrs(model.name).get("compute_dtype", {})) if start else {}
    for s in tqdm(range(start, n_shards), desc=f"merge {model.name}", unit="shard"):
        arrays = atlas.read_partial(model.name, s)
        used = arrays.pop("compute_dtype", None)  # (absent in partials of older versions)
        dtypes.update(json.loads(bytes(used).decode()) if used is not None else {})
        part, c = StatsPartial.from_arrays(arrays), read_counters(arrays, n_sources)
        acc = part if acc is None else merge_partials([acc, part])
        if c is not None:
            counts = c if counts is None else merge_counters([counts, c])
        if s + 1 == whole and whole > start:
            fp = np.frombuffer(prep["fingerprint"].encode(), np.uint8)
            extra = counts.to_arrays(PREFIX) if counts is not None else {}
            atlas.write_checkpoint(key, acc.to_arrays() | extra | {"fingerprint": fp}, whole,
                                   under=STATE)  # fmt: skip
    assert acc is not None
    stats = finalize(acc, job.record.dead_frequency, job.record.massive_threshold)
    dead_frac = {}
    for i, layer in enumerate(prep["layers"]):
        atlas.write_layer_stats(
            model.name, layer, {k: v[i] for k, v in stats.items()},
            acc.top_values[i], acc.top_positions[i],
        )  # fmt: skip
        dead_frac[layer] = float(stats["dead"][i].mean())
    kinds = None
    if counts is not None and prep.get("firing") is not None and job.record.taxonomy is not None:
        rule, thresholds = prep["firing"]
        kinds = write_labels(atlas, model.name, prep["layers"], counts, stats, rule,
                             job.record.taxonomy, thresholds)  # fmt: skip
    atlas.model_group(model.name).attrs.update({"complete": True, "tokens": int(acc.n),
                                                "compute_dtype": dtypes})  # fmt: skip
    atlas.touch()
    return {"tokens": int(acc.n), "dead_frac": dead_frac, "kinds": kinds}


def note_speed(atlas_path: str, models: list[ModelConfig], acct: dict | None) -> None:
    """Keep a stage's recording speed (its accounting) on its models (``neuronmap info``
    shows it); nothing when no shard ran."""
    if acct:
        atlas = Store.open(atlas_path)
        for m in models:
            atlas.model_group(m.name).attrs.update({"tokens_per_second": acct["tokens_per_s"]})
        get_run_logger().info("%s: %d tokens in %.1fs (%.0f tok/s)",
                              ", ".join(m.name for m in models), acct["tokens"], acct["seconds"],
                              acct["tokens_per_s"])  # fmt: skip
