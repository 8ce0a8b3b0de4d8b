"""The record stage: every layer's neuron statistics and the activation sample of a model
from one forward per batch (``ops.engine``), run by the stage runner (``flows.engine``);
then the weight-derived neuron properties.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from flows.config import JobConfig, ModelConfig, SAERunConfig
from flows.engine import Ledger, StageRun, run_stage
from flows.runtime import runtime_for
from flows.stage import Build, Shard, Stage
from flows.tasks import TASK
from flows.taxonomy import (
    PREFIX,
    counter_arrays,
    counter_consumers,
    firing,
    read_counters,
    write_labels,
)
from ops.engine import ActivationFeed, ActivationSample, Consumer, NeuronStats
from ops.stats import HistSpec, StatsPartial, finalize, hist_spec, merge_partials, stack_partials
from ops.taxonomy import CountersPartial, merge_counters
from storage.atlas import Atlas
from storage.layout import STATE
from storage.store import Store

# ------------------------------------------------------------------ the record stage


def _record_consumers(layers: list[int], sample_layers: list[int], k: int, spec: HistSpec,
                      feed_layer: int | None, counters: Build | None, shard: Shard
                      ) -> list[Consumer]:  # fmt: skip
    """Per shard: statistics of every recorded layer, the taxonomy's counters, the sample
    rows of this shard, and (when a streamed SAE shares the pass) the feed of its layer."""
    lm = shard.models[0]
    out: list[Consumer] = [NeuronStats((0, L), lm.d_mlp, k, spec, shard.device) for L in layers]
    if counters is not None:
        out += counters(shard)
    if sample_layers:
        per = shard.atlas.sample_rows_per_shard()
        want = shard.atlas.corpus["sample_positions"][shard.index * per : (shard.index + 1) * per]
        out += [ActivationSample((0, L), lm.d_mlp, want) for L in sample_layers]
    if feed_layer is not None:
        out.append(ActivationFeed((0, feed_layer)))
    return out


def _record_persist(model: str, shard: Shard, consumers: list[Consumer]) -> dict:
    """The shard's statistics partial (stacked over layers) and sample rows into the atlas;
    a feed goes back to the driver."""
    parts = [c.state() for c in consumers if isinstance(c, NeuronStats)]
    lm = shard.models[0]
    used = np.frombuffer(json.dumps({str(lm.dtype).removeprefix("torch."): lm.dtype_why})
                         .encode(), np.uint8)  # fmt: skip
    shard.atlas.write_partial(model, shard.index, stack_partials(parts)
                              | counter_arrays(consumers) | {"compute_dtype": used})  # fmt: skip
    out = {}
    for c in consumers:
        if isinstance(c, ActivationSample):
            shard.atlas.write_sample(model, c.sites[0][1], shard.index, c.state())
        elif isinstance(c, ActivationFeed):
            out["acts"] = c.state()
    return out


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


def record_stage(job: JobConfig, model: ModelConfig, prep: dict,
                 feed_layer: int | None = None) -> Stage:  # fmt: skip
    """Record: every layer's neuron statistics and the activation sample from one forward
    per batch; with ``feed_layer``, a streamed SAE's input too (the same forward)."""
    r = job.record
    spec = hist_spec(r.hist_bins, r.hist_min, r.hist_max)
    fire = prep.get("firing")
    counters = (partial(counter_consumers, r.taxonomy, prep["layers"], fire[1])
                if fire is not None and r.taxonomy is not None else None)  # fmt: skip
    return Stage(
        name=f"record/{model.name}", key=prep["fingerprint"], models=[model],
        build=partial(_record_consumers, prep["layers"], prep["sample_layers"], r.topk, spec,
                      feed_layer, counters),
        persist=partial(_record_persist, model.name), batch_size=r.batch_size,
        merge=partial(record_merge, job, model, prep), work=[model.name],
        description=f"record {model.name}",
    )  # fmt: skip


def _shared_stream(job: JobConfig, model: ModelConfig, prep: dict
                   ) -> tuple[SAERunConfig, Path] | None:  # fmt: skip
    """The streamed SAE run (and its checkpoint) whose first epoch can ride on this record
    pass: the first ``source: stream`` run on this model, when the stage starts from scratch
    and the run has no checkpoint yet (a resumed run streams on its own, from its checkpoint)."""
    from flows.dictionaries import checkpoint_path, dictionaries_fingerprint

    d = job.dictionaries
    run = (
        next((r for r in d.sae if r.source == "stream"), None)
        if d and d.model == model.name
        else None
    )
    entry = Atlas.open(job.atlas).done(f"record/{model.name}")
    if run is None or (entry.get("fingerprint") == prep["fingerprint"]
                       and (entry.get("shards") or entry.get("complete"))):  # fmt: skip
        return None
    key = Atlas.open(job.atlas).data_key(prep["fingerprint"])
    ckpt = checkpoint_path(job.atlas, run, dictionaries_fingerprint(d, key))
    return None if ckpt.exists() else (run, ckpt)


def note_speed(atlas_path: str, models: list[ModelConfig], out: dict) -> None:
    """Keep a stage's recording speed on its models (``neuronmap info`` shows it)."""
    acct = out.get("accounting")
    if acct:
        atlas = Store.open(atlas_path)
        for m in models:
            atlas.model_group(m.name).attrs.update({"tokens_per_second": acct["tokens_per_s"]})
        get_run_logger().info("%s: %d tokens in %.1fs (%.0f tok/s)",
                              ", ".join(m.name for m in models), acct["tokens"], acct["seconds"],
                              acct["tokens_per_s"])  # fmt: skip


@task(name="record", **TASK)
def record_model(job: JobConfig, model: ModelConfig, prep: dict, ledger: Ledger | None = None
                 ) -> dict:  # fmt: skip
    """The Ray driver of the record stage (merge included); a finished model returns at once.

    When the job streams an SAE over this model's layer, the record pass feeds it too: the
    SAE trains here, in shard order, on the activations of the same forward."""
    if job.record.taxonomy is not None and not Store.open(job.atlas).model_attrs(model.name).get(
        "complete"
    ):
        prep = prep | {"firing": firing(job, model, prep, ledger)}
    shared = _shared_stream(job, model, prep)
    if shared is None:
        out = run_stage(record_stage(job, model, prep), job.atlas, job.resources, ledger)
    else:
        from flows.dictionaries import train_sae_streamed

        stream, ckpt = shared
        assert job.dictionaries is not None
        layer = job.dictionaries.layer
        run = StageRun(record_stage(job, model, prep, feed_layer=layer), job.atlas,
                       job.resources, ledger, ordered=True)  # fmt: skip
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shards = iter(run)
        train_sae_streamed(job, model.name, layer, stream, str(ckpt), first_epoch=shards,
                           ledger=ledger)  # fmt: skip
        for _ in shards:  # a run shorter than one epoch leaves shards to record
            pass
        out = run.summary or {}
    note_speed(job.atlas, [model], out)
    return out


def _properties(source: str, revision: str | None, layers: list[int], top: int) -> dict:
    """Weight-derived properties of every layer, computed on a job worker (in float32, on
    the CPU: one more load of the model, whatever dtype the worker records in)."""
    import torch

    from ops.models import load_model
    from ops.props import label_neurons, neuron_properties, unembedding

    torch.set_num_threads(os.cpu_count() or 1)  # runs alone: no stage runs meanwhile
    lm = load_model(source, dtype="float32", device="cpu", revision=revision, with_tokenizer=False)
    w_u = unembedding(lm.model)
    out = {}
    for layer in tqdm(layers, desc=f"weight properties {source}", unit="layer", disable=None):
        props = neuron_properties(lm.model, layer, top=top, w_u=w_u)
        out[layer] = props | {k: v for k, v in label_neurons(props).items() if k != "dead"}
    return out


@task(name="properties", **TASK)
def model_properties(job: JobConfig, model: ModelConfig, prep: dict) -> dict:
    """W_in/W_out norms and cosine, vocabulary composition, prediction/suppression labels."""
    atlas = Store.open(job.atlas)
    if not job.record.properties or atlas.model_attrs(model.name).get("props_complete"):
        return {}
    with runtime_for(job.resources) as rt:
        per_layer = rt.call(_properties, model.source, model.revision, prep["layers"],
                            job.record.top_tokens)  # fmt: skip
    counts = {}
    for layer, arrays in per_layer.items():
        atlas.write_props(model.name, layer, arrays)
        counts[layer] = {
            k: int(arrays[k].sum()) for k in ("prediction", "suppression") if k in arrays
        }
    atlas.model_group(model.name).attrs.update({"props_complete": True})
    return counts
