"""The record stage: every layer's neuron statistics and the activation sample of a model
from one forward per batch (``ops.engine``), run by the stage runner (``flows.engine``);
then the weight-derived neuron properties.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from prefect import task
from tqdm.auto import tqdm

from flows.config import JobConfig, ModelConfig
from flows.engine import Ledger, StageRun, run_stage
from flows.runtime import runtime_for
from flows.stage import Build, Rider, Shard, Stage, StageResult
from flows.statistics import note_speed, record_merge
from flows.tasks import TASK
from flows.taxonomy import (
    counter_arrays,
    counter_consumers,
    firing,
)
from ops.engine import ActivationFeed, ActivationSample, Consumer, NeuronStats
from ops.stats import HistSpec, hist_spec, stack_partials
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


@dataclass
class RecordResult:
    """What the record stage did for one model."""

    tokens: int = 0
    """Tokens recorded and merged by this run (0: the model was complete already)."""
    dead_frac: dict[int, float] | None = None
    """Fraction of dead neurons per layer, when merged by this run."""
    kinds: dict[int, dict[str, float]] | None = None
    """Fraction of each taxonomy kind per layer, when labelled by this run."""
    accounting: dict[str, Any] | None = None
    """What the record stage cost (None when no shard ran)."""


@task(name="record", **TASK)
def record_model(job: JobConfig, model: ModelConfig, prep: dict, ledger: Ledger | None = None,
                 rider: Rider | None = None) -> dict:  # fmt: skip
    """The driver of the record stage (merge included); a finished model returns at once.

    With a ``rider`` (the pipeline's choice: a streamed SAE over one of this model's layers),
    the record pass feeds it too, in shard order, from the same forward; this stage does not
    know what the rider is."""
    if job.record.taxonomy is not None and not Store.open(job.atlas).model_attrs(model.name).get(
        "complete"
    ):
        prep = prep | {"firing": firing(job, model, prep, ledger)}
    if rider is None:
        out = run_stage(record_stage(job, model, prep), job.atlas, job.resources, ledger)
    else:
        run = StageRun(record_stage(job, model, prep, feed_layer=rider.layer), job.atlas,
                       job.resources, ledger, ordered=True)  # fmt: skip
        shards = iter(run)
        rider.consume(shards)
        for _ in shards:  # a rider that stops early leaves shards to record
            pass
        out = run.summary or StageResult()
    note_speed(job.atlas, [model], out.accounting)
    return RecordResult(tokens=out.merged.get("tokens", 0), dead_frac=out.merged.get("dead_frac"),
                        kinds=out.merged.get("kinds"), accounting=out.accounting)  # fmt: skip


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
