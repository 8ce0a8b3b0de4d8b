"""The dictionaries stage: SAEs and SNMF of one layer, their features over the corpus,
their causal checks.

* SAE runs train in a Ray task from the layer's stored sample (a fresh permutation per
  epoch), or from every corpus token streamed live by the workers (``source: stream``:
  an ``ActivationFeed`` in shard order through a shuffle buffer; the first streamed run
  shares the record stage's forward, see ``flows.record``). Checkpoints sit in the atlas's
  work area, keyed by the stage's content key, so a killed run resumes.
* SNMF runs distributed (``flows.snmf``): actors each hold some shards' sample rows and
  their ``Y``; ``ops.snmf.run`` is the one loop, local or on Ray.
* Features: one stage, one pass of the model for every dictionary of the layer
  (``ops.engine.FeatureStats`` per run), merged in shard order like neurons.
* A Ray task then computes each feature's logit lens, each SAE's CE loss recovered and the
  steering results (``flows.steering``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from flows.config import DictionariesConfig, JobConfig, ModelConfig, SAERunConfig
from flows.engine import Accounting, Ledger, run_stage, stream_stage
from flows.runtime import get, runtime_for
from flows.snmf import fit_snmf
from flows.stage import Rider, Shard, Stage
from flows.steering import contrast_direction, eval_batches, steer_directions
from flows.tasks import TASK
from ops import sae as sae_ops
from ops import snmf as snmf_ops
from ops.engine import ActivationFeed, Consumer, FeatureStats, Rows
from ops.stats import StatsPartial, finalize, hist_spec
from storage.atlas import Atlas
from storage.layout import contrast_key, steering_key
from storage.location import scratch_dir
from storage.store import Store


def _logger() -> Any:
    """The Prefect run logger inside a flow, a plain logger elsewhere (scripts, benches)."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("neuronmap")


def dictionaries_fingerprint(dcfg: DictionariesConfig, model_fingerprint: str) -> str:
    """Content key of the stage: its config and the recorded activations it learns from."""
    blob = json.dumps([dcfg.model_dump(mode="json"), model_fingerprint], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_path(atlas_path: str, run: SAERunConfig, key: str) -> Path:
    """Where an SAE run checkpoints: keyed by the stage key, so a changed config never
    resumes an old run (the record stage finds a fused streamed run's checkpoint here too)."""
    return scratch_dir(atlas_path) / "dictionaries" / f"sae-{run.name}-{key}.pt"


# ------------------------------------------------------------------ SAE


def streamed_rider(job: JobConfig, model: ModelConfig, prep: dict, ledger: Ledger | None = None
                   ) -> Rider | None:  # fmt: skip
    """The streamed SAE whose first epoch rides on ``model``'s record pass: the first
    ``source: stream`` run on this model, when the record stage starts from scratch and the
    run has no checkpoint yet (a resumed run streams on its own, from its checkpoint)."""
    d = job.dictionaries
    run = (
        next((r for r in d.sae if r.source == "stream"), None)
        if d and d.model == model.name
        else None
    )
    if run is None:
        return None
    atlas = Atlas.open(job.atlas)
    entry = atlas.done(f"record/{model.name}")
    if entry.get("fingerprint") == prep["fingerprint"] and (entry.get("shards")
                                                            or entry.get("complete")):  # fmt: skip
        return None
    ckpt = checkpoint_path(job.atlas, run, dictionaries_fingerprint(d, atlas.data_key(
        prep["fingerprint"])))  # fmt: skip
    if ckpt.exists():
        return None

    def consume(shards: Iterator[dict[str, Any]]) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        train_sae_streamed(job, model.name, d.layer, run, str(ckpt), first_epoch=shards,
                           ledger=ledger)  # fmt: skip

    return Rider(layer=d.layer, consume=consume)


def log_every(steps: int) -> int:
    """Training metrics every 100 steps, but at least ~20 points for a short run."""
    return max(1, min(100, steps // 20))


def _train_sae(atlas_path: str, model: str, layer: int, run: SAERunConfig, ckpt: str,
               device: str = "cpu") -> dict:  # fmt: skip
    """Train one SAE on the stored sample, on ``device`` (the job worker's: its GPU where
    workers take GPUs; batches go up as they are drawn)."""
    torch.set_num_threads(os.cpu_count() or 1)
    atlas = Atlas.open(atlas_path)
    shards = atlas.sample(model, layer)
    x = torch.from_numpy(np.concatenate([a for _, a, _ in shards]))
    # a latent silent for a whole pass over the sample counts as dead (AuxK)
    cfg = run.sae_config(x.shape[1], dead_after_tokens=len(x))
    torch.manual_seed(run.seed)
    sae = sae_ops.build_sae(cfg).to(device)
    sae.init_from(x)
    steps = max(1, math.ceil(run.epochs * len(x) / run.batch_size))

    def batches(start_step: int):
        # the stored sample is uniform over the corpus already; a fresh permutation per epoch
        # mixes it completely, and batch s depends only on (seed, s), so resuming is exact
        return sae_ops.sample_batches(x, run.batch_size, seed=run.seed, start_step=start_step)

    state = sae_ops.train(sae, batches, steps=steps, checkpoint=ckpt, checkpoint_every=200,
                          log_every=log_every(steps))  # fmt: skip
    return _sae_result(sae, state, x)


def _sae_result(sae: sae_ops.SAE, state: sae_ops.TrainState, x_eval: torch.Tensor | None
                ) -> dict:  # fmt: skip
    """What a training run hands back to the stage: weights, metrics on ``x_eval``, history."""
    return {"weights": {k: v.detach().cpu().numpy() for k, v in sae.state_dict().items()},
            "metrics": sae_ops.metrics(sae, x_eval, state) if x_eval is not None else {},
            "config": sae.cfg.to_dict(), "history": state.history, "steps": state.step,
            "tokens_trained": state.tokens_seen}  # fmt: skip


STREAM_DEAD_TOKENS = 10_000_000
"""A streamed latent silent this long counts as dead (capped: a pass can be 100M+ tokens)."""


def _feed_consumers(layer: int, shard: Shard) -> list[Consumer]:
    return [ActivationFeed((0, layer))]


def _feed_persist(shard: Shard, consumers: list[Consumer]) -> dict:
    return {"acts": consumers[0].state()}


def feed_stage(job: JobConfig, model: str, layer: int) -> Stage:
    """A pass that only streams one layer's activations to the driver (later epochs)."""
    spec = next(m for m in job.models if m.name == model)
    return Stage(name=f"stream/{model}/{layer}", key="", models=[spec],
                 build=partial(_feed_consumers, layer), persist=_feed_persist,
                 batch_size=job.record.batch_size)  # fmt: skip


def train_sae_streamed(job: JobConfig, model: str, layer: int, run: SAERunConfig, ckpt: str,
                       x_eval: torch.Tensor | None = None, stop_at: int | None = None,
                       first_epoch: Any = None, ledger: Ledger | None = None) -> dict:  # fmt: skip
    """Train on every corpus token, streamed live from the workers in shard order through a
    shuffle buffer; the checkpoint holds the buffer, so a killed run resumes mid-stream.

    ``first_epoch``, when given, is an iterator of shard results carrying ``"acts"`` in shard
    order (the record stage's own pass, see ``flows.record``): the first epoch then costs no
    forward of its own. ``stop_at`` ends the run early at that step (checkpointed), as a
    kill would. Metrics are measured on ``x_eval`` when given.
    """
    log = _logger()
    atlas = Atlas.open(job.atlas)
    n_shards = len(atlas.shard_ranges())
    n_tokens = int(atlas.corpus.attrs["n_tokens"])
    cfg = run.sae_config(atlas.model_attrs(model)["d_mlp"],
                         dead_after_tokens=min(n_tokens, STREAM_DEAD_TOKENS))  # fmt: skip
    steps = max(1, math.ceil(run.epochs * n_tokens / run.batch_size))
    order = [c % n_shards for c in range(math.ceil(run.epochs) * n_shards)]

    def chunks(start: int):
        rest = order[start:]
        if first_epoch is not None and start == 0:
            for out in first_epoch:
                yield torch.from_numpy(out["acts"].copy())  # Ray hands out read-only arrays
            rest = order[n_shards:]
        stage = feed_stage(job, model, layer)
        for out in stream_stage(stage, job.atlas, rest, job.resources, ledger):
            yield torch.from_numpy(out["acts"].copy())

    torch.manual_seed(run.seed)
    sae = sae_ops.build_sae(cfg)  # initialised from its first batch (a shuffled stream draw)
    data = sae_ops.StreamBatches(chunks, run.buffer_tokens, run.batch_size, seed=run.seed)

    def progress(step: int, m: dict[str, float]) -> None:
        log.info("sae %s (stream) step %d/%d: fvu %.4f l0 %.1f dead %.3f", run.name, step,
                 steps, m.get("fvu", float("nan")), m.get("l0", float("nan")),
                 m.get("dead_fraction", float("nan")))  # fmt: skip

    state = sae_ops.train(sae, data, steps=min(steps, stop_at or steps), checkpoint=ckpt,
                          checkpoint_every=500, log_every=log_every(steps),
                          on_metrics=progress)  # fmt: skip
    return _sae_result(sae, state, x_eval)


# ------------------------------------------------------------------ features over the corpus


def _snmf_encode(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[T, d]`` activations -> ``[T, k]`` SNMF coefficients under ``z [d, k]``."""
    return snmf_ops.transform(x.T, z).T


def _encoders(saes: dict[str, dict], snmfs: dict[str, np.ndarray], models: list
              ) -> dict[str, tuple[Any, int]]:  # fmt: skip
    """On each worker, once: ``"sae/<run>"`` / ``"snmf/<run>"`` -> (encode, width).

    SAE features are the encoder's output; SNMF features are the coefficients of a token
    under the fitted ``Z`` (``ops.snmf.transform``: nonnegative least squares per token)."""
    dev = models[0].device
    out: dict[str, tuple[Any, int]] = {}
    for n, s in saes.items():
        sae = sae_ops.from_weights(s["weights"], s["config"]).to(dev)
        out[f"sae/{n}"] = (sae.encode, sae.cfg.n_latents)
    for n, z in snmfs.items():
        zt = torch.from_numpy(np.array(z, np.float32)).to(dev)  # a copy: Ray hands out read-only arrays
        out[f"snmf/{n}"] = (partial(_snmf_encode, zt), zt.shape[1])
    return out


def _feature_consumers(layer: int, k: int, spec: Any, shard: Shard) -> list[Consumer]:
    return [FeatureStats((0, layer), enc, n, k, spec, shard.device, name=key)
            for key, (enc, n) in shard.setup.items()]  # fmt: skip


def _partial_key(model: str, key: str) -> str:
    return f"{model}.{key.replace('/', '.')}"


def _feature_persist(model: str, shard: Shard, consumers: list[Consumer]) -> dict:
    for c in consumers:
        shard.atlas.write_partial(_partial_key(model, c.name), shard.index,
                                  c.state().to_arrays())  # fmt: skip
    return {}


def _feature_merge(job: JobConfig, model: str, keys: list[str], atlas: Store) -> dict:
    out = {}
    shards = range(len(atlas.shard_ranges()))
    for key in keys:
        pk = _partial_key(model, key)
        merged = FeatureStats.merge([StatsPartial.from_arrays(atlas.read_partial(pk, s))
                                     for s in tqdm(shards, desc=f"merge {key}", unit="shard")])  # fmt: skip
        out[key] = (finalize(merged, job.record.dead_frequency, job.record.massive_threshold),
                    merged.top_values, merged.top_positions)  # fmt: skip
    return {"features": out}


def feature_stage(job: JobConfig, model: str, layer: int, saes: dict[str, dict],
                  snmfs: dict[str, np.ndarray], key: str) -> Stage:  # fmt: skip
    """Statistics and top examples of every feature of every dictionary over the whole
    corpus, from one pass of the model up to ``layer``."""
    r = job.record
    keys = [f"sae/{n}" for n in saes] + [f"snmf/{n}" for n in snmfs]
    return Stage(
        name=f"features/{model}/{layer}", key=key,
        models=[next(m for m in job.models if m.name == model)],
        setup=partial(_encoders, saes, snmfs),
        build=partial(_feature_consumers, layer, r.topk, hist_spec(r.hist_bins, r.hist_min,
                                                                   r.hist_max)),
        persist=partial(_feature_persist, model), batch_size=r.batch_size,
        merge=partial(_feature_merge, job, model, keys),
        work=[_partial_key(model, k) for k in keys], description=f"features {model} L{layer}",
    )  # fmt: skip


def sample_feature_stats(encode: Any, x: torch.Tensor, positions: np.ndarray,
                         job: JobConfig) -> tuple:  # fmt: skip
    """Neuron-style statistics and top-k of ``encode(x)`` over the stored sample ``x [T, d]``
    at ``positions`` (``feature_stats: sample``)."""
    r = job.record
    n = encode(x[:1]).shape[1]
    c = FeatureStats((0, 0), encode, n, r.topk, hist_spec(r.hist_bins, r.hist_min, r.hist_max))
    for a in range(0, x.shape[0], 4096):
        chunk = x[a : a + 4096]
        c.update((chunk,), Rows.of(np.arange(chunk.shape[0]), positions[a : a + 4096]))
    part = c.state()
    return (finalize(part, r.dead_frequency, r.massive_threshold), part.top_values,
            part.top_positions)  # fmt: skip


# ------------------------------------------------------------------ model-side measures


def _model_measures(job: JobConfig, dcfg: DictionariesConfig, directions: dict[str, np.ndarray],
                    saes: dict[str, dict], steer_dirs: dict[str, np.ndarray]) -> dict:  # fmt: skip
    """Logit lens of every feature direction, CE loss recovered for every SAE, and steering
    results for ``steer_dirs`` (under the key ``"steering"``)."""
    from ops.models import load_model
    from ops.props import direction_logit_lens, neuron_weights, unembedding

    torch.set_num_threads(os.cpu_count() or 1)
    spec = next(m for m in job.models if m.name == dcfg.model)
    lm = load_model(spec.source, dtype="float32", device="cpu", revision=spec.revision,
                    with_tokenizer=False)  # fmt: skip
    cost = {"tokens": 0, "forward_passes": 0}  # for the run accounting

    def count(_m: Any, _args: Any, kwargs: dict) -> None:
        cost["forward_passes"] += 1
        cost["tokens"] += int(kwargs["attention_mask"].sum())

    lm.model.register_forward_pre_hook(count, with_kwargs=True)
    _, w_out = neuron_weights(lm.model, dcfg.layer)
    w_u = unembedding(lm.model)
    out: dict[str, dict] = {}
    for key, dirs in directions.items():
        if w_u is None:
            break
        promoted, suppressed = direction_logit_lens(dirs, w_out, w_u, top=job.record.top_tokens)
        out[key] = {"promoted": promoted, "suppressed": suppressed}
    atlas = Atlas.open(job.atlas)
    bs = job.record.batch_size
    a, b = atlas.shard_ranges()[0]
    batches = eval_batches(atlas, np.arange(a, min(b, a + dcfg.ce_batches * bs)), bs)
    for key, s in saes.items():
        sae = sae_ops.from_weights(s["weights"], s["config"])
        out.setdefault(key, {})["ce"] = sae_ops.ce_losses(lm, dcfg.layer, sae, batches)
    if dcfg.steering is not None:
        out["steering"] = steer_directions(lm, atlas, dcfg.layer, steer_dirs, dcfg.steering, bs)
    out["cost"] = cost
    return out


# ------------------------------------------------------------------ the task


@task(name="dictionaries", **TASK)
def learn_dictionaries(job: JobConfig, dcfg: DictionariesConfig, ledger: Ledger | None = None
                       ) -> dict:  # fmt: skip
    """Train every SAE and SNMF run, then store weights, feature stats, metrics and steering."""
    log = get_run_logger()
    atlas = Store.open(job.atlas)
    model, layer, steering = dcfg.model, dcfg.layer, dcfg.steering
    fp = dictionaries_fingerprint(dcfg, atlas.data_key(atlas.model_attrs(model)["fingerprint"]))
    entry = atlas.done("dictionaries")
    if entry.get("complete") and entry.get("fingerprint") == fp:
        log.info("dictionaries of %s L%d already learned with this config", model, layer)
        return stored_summary(atlas, model, layer)
    # bad contrast sources fail before minutes of training
    baseline = ({contrast_key(*steering.contrast):
                 contrast_direction(atlas, model, layer, steering.contrast)}
                if steering is not None and steering.contrast else {})  # fmt: skip
    shards = atlas.sample(model, layer)
    x = torch.from_numpy(np.concatenate([a for _, a, _ in shards]))
    positions = np.concatenate([p for _, _, p in shards])
    ckpt = {run.name: str(checkpoint_path(job.atlas, run, fp)) for run in dcfg.sae}
    (scratch_dir(job.atlas) / "dictionaries").mkdir(parents=True, exist_ok=True)
    with runtime_for(job.resources) as rt:
        return _learn(rt, job, dcfg, ledger, fp, baseline, x, positions, ckpt)


def _learn(rt: Any, job: JobConfig, dcfg: DictionariesConfig, ledger: Ledger | None, fp: str,
           baseline: dict, x: torch.Tensor, positions: np.ndarray, ckpt: dict[str, str]
           ) -> dict:  # fmt: skip
    log = get_run_logger()
    atlas = Store.open(job.atlas)
    model, layer, steering = dcfg.model, dcfg.layer, dcfg.steering
    # sample-trained SAEs on the job's workers (one each, round robin) while the driver
    # streams and factorises
    sae_refs = {run.name: rt.call_async(_train_sae, job.atlas, model, layer, run, ckpt[run.name])
                for run in dcfg.sae if run.source == "sample"}  # fmt: skip
    # a streamed run the record stage already trained (sharing its pass) just loads here
    streamed = {run.name: train_sae_streamed(job, model, layer, run, ckpt[run.name], x,
                                             ledger=ledger)
                for run in dcfg.sae if run.source == "stream"}  # fmt: skip
    snmf = {run.name: fit_snmf(rt, job, model, layer, run, atlas) for run in dcfg.snmf}
    saes = {name: get(ref) for name, ref in sae_refs.items()} | streamed

    # feature activations -> neuron-style statistics, over the corpus (default) or the sample
    dirs = {f"sae/{n}": s["weights"]["W_dec"] for n, s in saes.items()}
    dirs |= {f"snmf/{n}": r.z.numpy().T for n, r in snmf.items()}
    if dcfg.feature_stats == "corpus" and dirs:
        stage = feature_stage(job, model, layer, saes, {n: r.z.numpy() for n, r in snmf.items()},
                              fp)  # fmt: skip
        stats = run_stage(stage, job.atlas, job.resources, ledger).merged["features"]
    else:
        stats = {f"sae/{n}": sample_feature_stats(sae_ops.from_weights(s["weights"], s["config"]
                                                                       ).encode, x, positions, job)
                 for n, s in saes.items()}  # fmt: skip
        stats |= {f"snmf/{n}": sample_feature_stats(lambda y: y, r.y.T.contiguous(), positions,
                                                    job) for n, r in snmf.items()}  # fmt: skip

    steer_dirs = dict(baseline)
    if steering is not None:
        for key, (st, _, _) in stats.items():
            method, run = key.split("/")
            for i in np.argsort(-st["mean"], kind="stable")[: steering.features]:
                steer_dirs[steering_key(method, run, int(i))] = dirs[key][int(i)]
    acct = Accounting("dictionaries/measures", corpus_tokens=int(atlas.corpus.attrs["n_tokens"]))
    measures = rt.call(_model_measures, job, dcfg, dirs, {f"sae/{n}": s for n, s in saes.items()},
                       steer_dirs)  # fmt: skip
    acct.add(measures.pop("cost"))
    if ledger is not None:
        ledger.record(acct.to_dict())

    sources = {run.name: run.source for run in dcfg.sae}
    for name, s in saes.items():
        st, tv, tp = stats[f"sae/{name}"]
        meas = measures.get(f"sae/{name}", {})
        metrics = s["metrics"] | {f"ce_{k}": v for k, v in meas.get("ce", {}).items()}
        weights = dict(s["weights"])
        weights |= {k: meas[k] for k in ("promoted", "suppressed") if k in meas}
        atlas.write_dictionary(model, layer, "sae", name, weights, st, tv, tp,
                               {"config": s["config"], "metrics": metrics, "steps": s["steps"],
                                "history": sae_ops.thin(s["history"], 200), "tokens": len(x),
                                "tokens_trained": s["tokens_trained"],
                                "source": sources[name], "feature_stats": dcfg.feature_stats})  # fmt: skip
        log.info("sae %s: %s", name, {k: round(v, 4) for k, v in metrics.items()})
    for name, r in snmf.items():
        st, tv, tp = stats[f"snmf/{name}"]
        meas = measures.get(f"snmf/{name}", {})
        weights = {"Z": r.z.numpy()} | {k: meas[k] for k in ("promoted", "suppressed") if k in meas}
        metrics = {"rel_error": r.rel_error, "best_iter": r.best_iter,
                   "iters": len(r.loss_history), "loss": r.loss_history[r.best_iter]}  # fmt: skip
        atlas.write_dictionary(model, layer, "snmf", name, weights, st, tv, tp,
                               {"metrics": metrics, "loss_history": r.loss_history,
                                "tokens": len(x), "feature_stats": dcfg.feature_stats})  # fmt: skip
        log.info("snmf %s: %s", name, metrics)
    if measures.get("steering"):
        atlas.write_steering(model, layer, measures["steering"], baseline)
        for key, res in measures["steering"].items():
            log.info("steering %s: alpha_rel %.3g kl %.3f", key, res["alpha_rel"], res["kl"])
    atlas.mark("dictionaries", fp, complete=True)
    shutil.rmtree(scratch_dir(job.atlas) / "dictionaries", ignore_errors=True)
    atlas.touch()
    return stored_summary(atlas, model, layer)


def stored_summary(atlas: Atlas, model: str, layer: int) -> dict[str, dict]:
    """The stage's result as stored: every run's metrics, every steering result's fit."""
    runs = atlas.dictionary_overview(model).get(layer, {}).get("runs", {})
    steer = {f"steering/{k}": {"alpha_rel": r.alpha_rel, "kl": r.kl, "converged": r.converged}
             for k, r in atlas.steering(model, layer).items()}  # fmt: skip
    return runs | steer
