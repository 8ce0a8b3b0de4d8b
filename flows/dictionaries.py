"""Dictionaries stage: SAEs and SNMF over one layer's stored activation sample.

* SAE runs train in a Ray task from the sample (a fresh permutation per epoch),
  checkpointing into the atlas's work area so a killed run resumes.
* SNMF runs distributed: ``SNMFWorker`` actors each hold some corpus shards' sample rows
  and their local ``Y``; per iteration the driver sums the shard reductions in shard order
  and solves for ``Z`` (``ops.snmf.run`` is the one loop, local or on Ray).
* Every feature then gets neuron-style statistics and top examples over the sample, its
  strongest neurons, and its logit-lens tokens; SAEs also get the CE loss recovered when
  their reconstruction is spliced into the model.
* With ``steering``, the most active features of each run and a difference-in-means
  baseline between two corpus sources are steered at the same next-token KL
  (``ops.steering``); ``neuronmap steer`` runs the same evaluation for any feature.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from flows.config import (
    DictionariesConfig,
    JobConfig,
    JobConfigError,
    ModelConfig,
    SAERunConfig,
    SNMFRunConfig,
    SteeringConfig,
)
from flows.record import (
    ActivationRecorder,
    attention_mask,
    ensure_ray,
    iter_shards,
    run_shards,
    shard_batches,
    worker_model,
)
from flows.tasks import TASK
from ops import sae as sae_ops
from ops import snmf as snmf_ops
from ops.models import capture_mlp, forward_until
from ops.stats import NeuronAccumulator, StatsPartial, finalize, hist_spec, merge_partials
from ops.steering import SteeringEval, diff_in_means, steer
from storage.atlas import Atlas
from storage.dictionaries import contrast_key, steering_key


def sample_by_shard(
    atlas: Atlas, model: str, layer: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(shard, activations [T_s, d] float32, positions [T_s]) for every shard's sample rows."""
    arr = atlas.model_group(model)["layers"][str(layer)]["sample"]
    pos = atlas.corpus["sample_positions"][...]
    per = atlas.sample_rows_per_shard()
    out = []
    for s in range(len(atlas.shard_ranges())):
        p = pos[s * per : (s + 1) * per]
        ok = p >= 0
        if ok.any():
            out.append((s, arr[s * per : (s + 1) * per][ok].astype(np.float32), p[ok]))
    return out


def feature_stats(
    acts: torch.Tensor, positions: np.ndarray, job: JobConfig
) -> tuple[dict, Any, Any]:
    """Neuron-style statistics and top-k of feature activations ``[T, n]`` at ``positions``."""
    r = job.record
    acc = NeuronAccumulator(acts.shape[1], r.topk, hist_spec(r.hist_bins, r.hist_min, r.hist_max))
    pos = torch.from_numpy(positions)
    for a in range(0, acts.shape[0], 4096):
        acc.update(acts[a : a + 4096], pos[a : a + 4096])
    part = acc.partial()
    stats = finalize(part, r.dead_frequency, r.massive_threshold)
    return stats, part.top_values, part.top_positions


class FeatureRecorder:
    """Feature activations of every recorded token of a shard, folded into mergeable
    statistics (one partial per run): features get the corpus-wide pass neurons get.

    SAE features are the encoder's output; SNMF features are the coefficients of the token
    under the fitted ``Z`` (``ops.snmf.transform``: nonnegative least squares per token).
    """

    def __init__(self, model: ModelConfig, job: JobConfig, atlas_path: str, layer: int,
                 saes: dict[str, dict], snmfs: dict[str, np.ndarray],
                 device: str | None = None):  # fmt: skip
        self.loaded = worker_model(model, device)
        dev = self.loaded.device
        # key -> (encoder [T, d] -> [T, n], n)
        self.encoders: dict[str, tuple[Any, int]] = {}
        for n, s in saes.items():
            sae = _sae_from(s["weights"], s["config"]).to(dev)
            self.encoders[f"sae/{n}"] = (sae.encode, sae.cfg.n_latents)
        for n, z in snmfs.items():
            zt = torch.from_numpy(np.asarray(z, np.float32)).to(dev)
            self.encoders[f"snmf/{n}"] = (partial(_snmf_encode, zt), zt.shape[1])
        self.atlas = Atlas.open(atlas_path, mode="r+")
        self.model, self.layer, self.rec = model.name, layer, job.record
        self.spec = hist_spec(job.record.hist_bins, job.record.hist_min, job.record.hist_max)

    @torch.no_grad()
    def record(self, shard: int) -> dict[str, Any]:
        dev = self.loaded.device
        accs = {k: NeuronAccumulator(n, self.rec.topk, self.spec, dev)
                for k, (_, n) in self.encoders.items()}  # fmt: skip
        state: dict[str, torch.Tensor] = {}

        def on_act(_layer: int, act: torch.Tensor) -> None:
            x = act.reshape(-1, act.shape[-1]).index_select(0, state["rows"]).float()
            for k, (encode, _) in self.encoders.items():
                accs[k].update(encode(x), state["positions"])

        n_tok = 0
        with capture_mlp(self.loaded, [self.layer], on_act):
            for ids, attn, rows, pos in shard_batches(self.atlas, shard, self.rec.batch_size):
                state["rows"] = torch.from_numpy(rows).to(dev)
                state["positions"] = torch.from_numpy(pos).to(dev)
                n_tok += len(rows)
                forward_until(self.loaded, ids, attn, self.layer)
        for k, acc in accs.items():
            self.atlas.write_partial(_partial_key(self.model, k), shard, acc.partial().to_arrays())
        return {"shard": shard, "tokens": n_tok}


def _snmf_encode(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[T, d]`` activations -> ``[T, k]`` SNMF coefficients under ``z [d, k]``."""
    return snmf_ops.transform(x.T, z).T


def _partial_key(model: str, key: str) -> str:
    return f"{model}.{key.replace('/', '.')}"


def corpus_feature_stats(job: JobConfig, model: str, layer: int, saes: dict[str, dict],
                         snmfs: dict[str, np.ndarray]) -> dict[str, tuple]:  # fmt: skip
    """``"sae/<run>"`` / ``"snmf/<run>"`` -> (stats, top values, top positions) of every
    feature over the whole corpus."""
    log = _logger()
    atlas = Atlas.open(job.atlas, mode="r+")
    spec = next(m for m in job.models if m.name == model)
    shards = list(range(len(atlas.shard_ranges())))
    bar = tqdm(total=len(shards), desc=f"feature stats {model} L{layer}", unit="shard")
    run_shards(FeatureRecorder, (spec, job, job.atlas, layer, saes, snmfs), {}, shards,
               job.resources, lambda _out: bar.update())  # fmt: skip
    bar.close()
    out = {}
    for key in [f"sae/{n}" for n in saes] + [f"snmf/{n}" for n in snmfs]:
        pk = _partial_key(model, key)
        merged = merge_partials([StatsPartial.from_arrays(atlas.read_partial(pk, s))
                                 for s in shards])  # fmt: skip
        out[key] = (finalize(merged, job.record.dead_frequency, job.record.massive_threshold),
                    merged.top_values, merged.top_positions)  # fmt: skip
        atlas.drop_partials(pk)
        log.info("%s: feature statistics over %d corpus tokens", key, merged.n)
    return out


# ------------------------------------------------------------------ SAE


def log_every(steps: int) -> int:
    """Training metrics every 100 steps, but at least ~20 points for a short run."""
    return max(1, min(100, steps // 20))


def sae_config(run: SAERunConfig, d: int, tokens: int) -> sae_ops.SAEConfig:
    # a latent that stays silent for a whole pass over the sample counts as dead (AuxK)
    return sae_ops.SAEConfig(arch=run.arch, d_in=d, n_latents=run.expansion * d, k=run.k,
                             l1_coef=run.l1_coef, lr=run.lr, batch_size=run.batch_size,
                             seed=run.seed, dead_after_tokens=tokens)  # fmt: skip


@ray.remote(num_cpus=1)
def _train_sae(atlas_path: str, model: str, layer: int, run: SAERunConfig, ckpt: str) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    atlas = Atlas.open(atlas_path)
    shards = sample_by_shard(atlas, model, layer)
    x = torch.from_numpy(np.concatenate([a for _, a, _ in shards]))
    cfg = sae_config(run, x.shape[1], len(x))
    torch.manual_seed(run.seed)
    sae = sae_ops.build_sae(cfg)
    sae.init_from(x)
    steps = max(1, math.ceil(run.epochs * len(x) / run.batch_size))

    def batches(start_step: int):
        # the stored sample is uniform over the corpus already; a fresh permutation per epoch
        # mixes it completely, and batch s depends only on (seed, s), so resuming is exact
        return sae_ops.sample_batches(x, run.batch_size, seed=run.seed, start_step=start_step)

    state = sae_ops.train(sae, batches, steps=steps, checkpoint=ckpt, checkpoint_every=200,
                          log_every=log_every(steps))  # fmt: skip
    return _sae_result(sae, state, x)


def _sae_result(sae: sae_ops.SAE, state: sae_ops.TrainState, x_eval: torch.Tensor) -> dict:
    """What a training run hands back to the stage: weights, metrics on ``x_eval``, history."""
    return {"weights": {k: v.detach().cpu().numpy() for k, v in sae.state_dict().items()},
            "metrics": sae_ops.metrics(sae, x_eval, state), "config": sae.cfg.to_dict(),
            "history": state.history, "steps": state.step,
            "tokens_trained": state.tokens_seen}  # fmt: skip


def _logger() -> Any:
    """The Prefect run logger inside a flow, a plain logger elsewhere (scripts, benches)."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("neuronmap")


STREAM_DEAD_TOKENS = 10_000_000
"""A streamed latent silent this long counts as dead (capped: a pass can be 100M+ tokens)."""


def train_sae_streamed(job: JobConfig, model: str, layer: int, run: SAERunConfig, ckpt: str,
                       x_eval: torch.Tensor, stop_at: int | None = None) -> dict:  # fmt: skip
    """Train on every corpus token, streamed live from ``ShardWorker`` actors through a
    shuffle buffer; the checkpoint holds the buffer, so a killed run resumes mid-stream.
    ``stop_at`` ends the run early at that step (checkpointed), as a kill would."""
    log = _logger()
    atlas = Atlas.open(job.atlas)
    spec = next(m for m in job.models if m.name == model)
    n_shards = len(atlas.shard_ranges())
    n_tokens = int(np.count_nonzero(atlas.corpus["mask"][...]))
    cfg = sae_config(run, x_eval.shape[1], min(n_tokens, STREAM_DEAD_TOKENS))
    steps = max(1, math.ceil(run.epochs * n_tokens / run.batch_size))
    order = [c % n_shards for c in range(math.ceil(run.epochs) * n_shards)]

    def chunks(start: int):
        args = (spec, job.atlas, layer, job.record.batch_size)
        for out in iter_shards(ActivationRecorder, args, {}, order[start:], job.resources,
                               ordered=True):  # fmt: skip
            yield torch.from_numpy(out["acts"].copy())  # Ray hands out read-only arrays

    torch.manual_seed(run.seed)
    sae = sae_ops.build_sae(cfg)
    sae.init_from(x_eval)  # the stored sample is a uniform draw over the corpus
    data = sae_ops.StreamBatches(chunks, run.buffer_tokens, run.batch_size, seed=run.seed)

    def progress(step: int, m: dict[str, float]) -> None:
        log.info("sae %s (stream) step %d/%d: fvu %.4f l0 %.1f dead %.3f", run.name, step,
                 steps, m.get("fvu", float("nan")), m.get("l0", float("nan")),
                 m.get("dead_fraction", float("nan")))  # fmt: skip

    state = sae_ops.train(sae, data, steps=min(steps, stop_at or steps), checkpoint=ckpt,
                          checkpoint_every=500, log_every=log_every(steps),
                          on_metrics=progress)  # fmt: skip
    return _sae_result(sae, state, x_eval)


def _sae_from(weights: dict, config: dict) -> sae_ops.SAE:
    sae = sae_ops.build_sae(sae_ops.SAEConfig.from_dict(config))
    sae.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return sae.eval()


# ------------------------------------------------------------------ SNMF on Ray


@ray.remote
class SNMFWorker:
    """Holds some shards' sample rows (as ``A_s [d, T_s]``) and their ``Y_s``."""

    def __init__(self, atlas_path: str, model: str, layer: int, shards: list[int],
                 cfg: snmf_ops.SNMFConfig, threads: int | None = 1):  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        atlas = Atlas.open(atlas_path)
        keep = set(shards)
        self.parts = {s: torch.from_numpy(a.T.copy()) for s, a, _ in
                      sample_by_shard(atlas, model, layer) if s in keep}  # fmt: skip
        self.local = snmf_ops.LocalShards(list(self.parts.values()), cfg)
        self.order = list(self.parts)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.local, method)(*args)


class RayShards:
    """The ``ops.snmf`` shard interface over several ``SNMFWorker`` actors, in shard order."""

    def __init__(self, actors: list, counts: list[int]):
        self.actors, self.counts = actors, counts

    def _all(self, method: str, *args: Any) -> list:
        outs = ray.get([a.call.remote(method, *args) for a in self.actors])
        return [x for out in outs for x in out]  # actors hold consecutive shard ranges

    def n_tokens(self) -> int:
        return sum(self.counts)

    def columns(self, idx: np.ndarray) -> torch.Tensor:
        bounds = np.cumsum([0] + self.counts)
        cols = []
        for i, a in enumerate(self.actors):
            mine = idx[(idx >= bounds[i]) & (idx < bounds[i + 1])] - bounds[i]
            cols.append(ray.get(a.call.remote("columns", mine)))
        return torch.cat(cols, dim=1)

    def init(self, z: torch.Tensor) -> None:
        ray.get([a.call.remote("init", z) for a in self.actors])

    def reductions(self) -> list:
        return self._all("reductions")

    def step(self, z: torch.Tensor, scale: torch.Tensor) -> list[float]:
        return self._all("step", z, scale)

    def norms(self) -> list[float]:
        return self._all("norms")

    def keep_best(self) -> None:
        ray.get([a.call.remote("keep_best") for a in self.actors])

    def best_y(self) -> list[torch.Tensor]:
        return self._all("best_y")


def fit_snmf_on_ray(job: JobConfig, model: str, layer: int, run: SNMFRunConfig,
                    atlas: Atlas) -> snmf_ops.SNMFResult:  # fmt: skip
    """SNMF with the tokens spread over ``resources.workers`` actors (shard-aligned)."""
    cfg = snmf_ops.SNMFConfig(k=run.k, keep_fraction=run.keep_fraction, iters=run.iters,
                              patience=run.patience, init=run.init, seed=run.seed)  # fmt: skip
    shards = sample_by_shard(atlas, model, layer)
    ensure_ray(job.resources.ray_address, job.resources.workers)
    groups = [g.tolist() for g in np.array_split(np.array([s for s, _, _ in shards]),
                                                 min(job.resources.workers, len(shards)))]  # fmt: skip
    counts = {s: len(p) for s, _, p in shards}
    actors = [SNMFWorker.options(num_cpus=1).remote(job.atlas, model, layer, g, cfg)
              for g in groups]  # fmt: skip
    try:
        backend = RayShards(actors, [sum(counts[s] for s in g) for g in groups])
        return snmf_ops.run(backend, cfg)
    finally:
        for a in actors:
            ray.kill(a)


# ------------------------------------------------------------------ steering


def steering_batches(atlas: Atlas, sequences: int, batch_size: int) -> list[tuple]:
    """``sequences`` corpus rows spread evenly over the corpus, as (ids, attention, counted)."""
    tokens, mask = atlas.corpus["tokens"], atlas.corpus["mask"]
    rows = np.unique(np.linspace(0, tokens.shape[0] - 1, sequences).round().astype(np.int64))
    ids = tokens.oindex[rows, :].astype(np.int64)
    m = mask.oindex[rows, :]
    return [(torch.from_numpy(ids[a : a + batch_size]),
             torch.from_numpy(attention_mask(m[a : a + batch_size])),
             torch.from_numpy(m[a : a + batch_size]))
            for a in range(0, len(rows), batch_size)]  # fmt: skip


def contrast_direction(atlas: Atlas, model: str, layer: int, contrast: list[str]) -> np.ndarray:
    """Mean sampled activation on sequences of source ``contrast[0]`` minus ``contrast[1]``."""
    names = list(atlas.corpus.attrs["source_names"])
    missing = [c for c in contrast if c not in names]
    if missing:
        raise JobConfigError(f"dictionaries.steering.contrast: {missing} not among the corpus "
                             f"sources {names}")  # fmt: skip
    shards = sample_by_shard(atlas, model, layer)
    acts = np.concatenate([a for _, a, _ in shards])
    seq = np.concatenate([p for _, _, p in shards]) // int(atlas.corpus.attrs["seq_len"])
    labels = atlas.corpus["sources"][...][seq]
    a, b = (names.index(c) for c in contrast)
    for c, i in zip(contrast, (a, b), strict=True):
        if not np.any(labels == i):
            raise JobConfigError(f"dictionaries.steering.contrast: no sampled tokens from {c!r}; "
                                 "raise record.sample_tokens or corpus.max_tokens")  # fmt: skip
    return diff_in_means(acts, labels, a, b)


def steer_directions(loaded: Any, atlas: Atlas, layer: int, directions: dict[str, np.ndarray],
                     cfg: SteeringConfig, batch_size: int) -> dict[str, dict]:  # fmt: skip
    """Steering results (JSON-able) for ``directions`` (key -> ``[d_mlp]``) at ``cfg.target_kl``."""
    if not directions:
        return {}
    ev = SteeringEval(loaded, layer, steering_batches(atlas, cfg.sequences, batch_size))
    return {key: steer(ev, d, cfg.target_kl, cfg.tolerance, cfg.max_evals,
                       cfg.top_tokens).to_dict()
            for key, d in directions.items()}  # fmt: skip


def steer_feature(atlas_path: str, model: str, layer: int, cfg: SteeringConfig, *,
                  method: str | None = None, run: str | None = None, feature: int | None = None,
                  contrast: list[str] | None = None, batch_size: int = 8,
                  device: str | None = None) -> str:  # fmt: skip
    """Steer one stored feature (``method``/``run``/``feature``) or a ``contrast`` baseline live,
    store the result in the atlas, and return its key (``Atlas.steering`` reads it back)."""
    from ops.models import load_model

    atlas = Atlas.open(atlas_path, mode="r+").owner(model)
    if (feature is None) == (contrast is None):
        raise JobConfigError("steer: give a feature (with its method) or a contrast, not both")
    baseline: dict[str, np.ndarray] = {}
    if contrast is not None:
        key = contrast_key(*contrast)
        baseline[key] = direction = contrast_direction(atlas, model, layer, contrast)
    else:
        if method is None:
            raise JobConfigError("steer: --method (sae or snmf) is needed with --feature")
        g = atlas.dictionary(model, layer, method, run)
        dirs = atlas.feature_directions(g, method)
        if not 0 <= feature < len(dirs):
            raise JobConfigError(f"steer: feature {feature} out of range: {method}/{g.basename} "
                                 f"has {len(dirs)} features")  # fmt: skip
        key, direction = steering_key(method, g.basename, feature), dirs[feature]
    attrs = atlas.model_attrs(model)
    lm = load_model(attrs["source"], dtype="float32", device=device, revision=attrs.get("revision"),
                    with_tokenizer=False)  # fmt: skip
    res = steer_directions(lm, atlas, layer, {key: direction}, cfg, batch_size)
    atlas.write_steering(model, layer, res, baseline)
    return key


# ------------------------------------------------------------------ model-side measures


def _splice(sae: sae_ops.SAE, act: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction in place of the activation (same shape)."""
    return sae(act.float().reshape(-1, act.shape[-1]))[0].reshape(act.shape)


@ray.remote(num_cpus=1)
def _model_measures(job: JobConfig, dcfg: DictionariesConfig, directions: dict[str, np.ndarray],
                    saes: dict[str, dict], steer_dirs: dict[str, np.ndarray]) -> dict:  # fmt: skip
    """Logit lens of every feature direction, CE loss recovered for every SAE, and steering
    results for ``steer_dirs`` (under the key ``"steering"``)."""
    from ops.interventions import next_token_loss, replace_mlp_activation
    from ops.models import load_model
    from ops.props import direction_logit_lens, neuron_weights, unembedding

    torch.set_num_threads(os.cpu_count() or 1)
    spec = next(m for m in job.models if m.name == dcfg.model)
    lm = load_model(spec.source, dtype="float32", device="cpu", revision=spec.revision,
                    with_tokenizer=False)  # fmt: skip
    _, w_out = neuron_weights(lm.model, dcfg.layer)
    w_u = unembedding(lm.model)
    out: dict[str, dict] = {}
    for key, dirs in directions.items():
        if w_u is None:
            break
        promoted, suppressed = direction_logit_lens(dirs, w_out, w_u, top=job.record.top_tokens)
        out[key] = {"promoted": promoted, "suppressed": suppressed}
    atlas = Atlas.open(job.atlas)
    tokens, mask = atlas.read_shard(0)
    bs = job.record.batch_size
    for key, s in saes.items():
        sae = _sae_from(s["weights"], s["config"])
        totals = {"clean": [0.0, 0], "zero": [0.0, 0], "sae": [0.0, 0]}
        for b in range(dcfg.ce_batches):
            ids = torch.from_numpy(tokens[b * bs : (b + 1) * bs].astype(np.int64))
            m = torch.from_numpy(mask[b * bs : (b + 1) * bs])
            if ids.numel() == 0:
                break
            attn = torch.from_numpy(attention_mask(m.numpy()))
            loss_mask = m & torch.roll(m, -1, dims=1)  # predict a recorded next token
            for name, fn in (("clean", None), ("zero", torch.zeros_like),
                             ("sae", partial(_splice, sae))):  # fmt: skip
                if fn is None:
                    ce, n = next_token_loss(lm, ids, attn, loss_mask)
                else:
                    with replace_mlp_activation(lm, dcfg.layer, fn):
                        ce, n = next_token_loss(lm, ids, attn, loss_mask)
                totals[name][0] += ce
                totals[name][1] += n
        loss = {k: v[0] / max(v[1], 1) for k, v in totals.items()}
        out.setdefault(key, {})["ce"] = loss | {
            "recovered": sae_ops.ce_loss_recovered(loss["clean"], loss["sae"], loss["zero"])
        }
    if dcfg.steering is not None:
        out["steering"] = steer_directions(lm, atlas, dcfg.layer, steer_dirs, dcfg.steering, bs)
    return out


# ------------------------------------------------------------------ the task


@task(name="dictionaries", **TASK)
def learn_dictionaries(job: JobConfig, dcfg: DictionariesConfig) -> dict:
    """Train every SAE and SNMF run, then store weights, feature stats, metrics and steering."""
    log = get_run_logger()
    atlas = Atlas.open(job.atlas, mode="r+")
    model, layer, steering = dcfg.model, dcfg.layer, dcfg.steering
    fp = dictionaries_fingerprint(dcfg, atlas.model_attrs(model)["fingerprint"])
    entry = atlas.done("dictionaries")
    if entry.get("complete") and entry.get("fingerprint") == fp:
        log.info("dictionaries of %s L%d already learned with this config", model, layer)
        return stored_summary(atlas, model, layer)
    # bad contrast sources fail before minutes of training
    baseline = ({contrast_key(*steering.contrast):
                 contrast_direction(atlas, model, layer, steering.contrast)}
                if steering is not None and steering.contrast else {})  # fmt: skip
    shards = sample_by_shard(atlas, model, layer)
    x = torch.from_numpy(np.concatenate([a for _, a, _ in shards]))
    positions = np.concatenate([p for _, _, p in shards])
    ensure_ray(job.resources.ray_address, job.resources.workers)
    work = Path(job.atlas) / "_work" / "dictionaries"
    work.mkdir(parents=True, exist_ok=True)
    # checkpoints are keyed by the stage fingerprint: a changed config never resumes an old run
    sae_refs = {run.name: _train_sae.remote(job.atlas, model, layer, run,
                                            str(work / f"sae-{run.name}-{fp}.pt"))
                for run in dcfg.sae if run.source == "sample"}  # fmt: skip
    streamed = {run.name: train_sae_streamed(job, model, layer, run,
                                             str(work / f"sae-{run.name}-{fp}.pt"), x)
                for run in dcfg.sae if run.source == "stream"}  # fmt: skip
    snmf = {run.name: fit_snmf_on_ray(job, model, layer, run, atlas) for run in dcfg.snmf}
    saes = {name: ray.get(ref) for name, ref in sae_refs.items()} | streamed

    # feature activations -> neuron-style statistics, over the corpus (default) or the sample
    feats: dict[str, tuple[np.ndarray, tuple]] = {}  # key -> (directions [n, d], stats)
    if dcfg.feature_stats == "corpus" and (saes or snmf):
        stats = corpus_feature_stats(job, model, layer, saes,
                                     {n: r.z.numpy() for n, r in snmf.items()})  # fmt: skip
        feats |= {f"sae/{n}": (s["weights"]["W_dec"], stats[f"sae/{n}"]) for n, s in saes.items()}
        feats |= {f"snmf/{n}": (r.z.numpy().T, stats[f"snmf/{n}"]) for n, r in snmf.items()}
    else:
        for name, s in saes.items():
            sae = _sae_from(s["weights"], s["config"])
            with torch.no_grad():
                acts = torch.cat([sae.encode(x[a : a + 4096]) for a in range(0, len(x), 4096)])
            feats[f"sae/{name}"] = (s["weights"]["W_dec"], feature_stats(acts, positions, job))
        for name, r in snmf.items():
            feats[f"snmf/{name}"] = (r.z.numpy().T,
                                     feature_stats(r.y.T.contiguous(), positions, job))  # fmt: skip

    steer_dirs = dict(baseline)
    if steering is not None:
        for key, (dirs, (stats, _, _)) in feats.items():
            method, run = key.split("/")
            for i in np.argsort(-stats["mean"], kind="stable")[: steering.features]:
                steer_dirs[steering_key(method, run, int(i))] = dirs[int(i)]
    measures = ray.get(_model_measures.remote(
        job, dcfg, {k: d for k, (d, _) in feats.items()},
        {f"sae/{n}": s for n, s in saes.items()}, steer_dirs))  # fmt: skip

    sources = {run.name: run.source for run in dcfg.sae}
    for name, s in saes.items():
        stats, tv, tp = feats[f"sae/{name}"][1]
        meas = measures.get(f"sae/{name}", {})
        metrics = s["metrics"] | {f"ce_{k}": v for k, v in meas.get("ce", {}).items()}
        weights = dict(s["weights"])
        weights |= {k: meas[k] for k in ("promoted", "suppressed") if k in meas}
        atlas.write_dictionary(model, layer, "sae", name, weights, stats, tv, tp,
                               {"config": s["config"], "metrics": metrics, "steps": s["steps"],
                                "history": thin(s["history"], 200), "tokens": len(x),
                                "tokens_trained": s["tokens_trained"],
                                "source": sources[name], "feature_stats": dcfg.feature_stats})  # fmt: skip
        log.info("sae %s: %s", name, {k: round(v, 4) for k, v in metrics.items()})
    for name, r in snmf.items():
        stats, tv, tp = feats[f"snmf/{name}"][1]
        meas = measures.get(f"snmf/{name}", {})
        weights = {"Z": r.z.numpy()} | {k: meas[k] for k in ("promoted", "suppressed") if k in meas}
        metrics = {"rel_error": r.rel_error, "best_iter": r.best_iter,
                   "iters": len(r.loss_history), "loss": r.loss_history[r.best_iter]}  # fmt: skip
        atlas.write_dictionary(model, layer, "snmf", name, weights, stats, tv, tp,
                               {"metrics": metrics, "loss_history": r.loss_history,
                                "tokens": len(x), "feature_stats": dcfg.feature_stats})  # fmt: skip
        log.info("snmf %s: %s", name, metrics)
    if measures.get("steering"):
        atlas.write_steering(model, layer, measures["steering"], baseline)
        for key, res in measures["steering"].items():
            log.info("steering %s: alpha_rel %.3g kl %.3f", key, res["alpha_rel"], res["kl"])
    atlas.mark("dictionaries", fp, complete=True)
    shutil.rmtree(work, ignore_errors=True)  # checkpoints of finished runs
    atlas.touch()
    return stored_summary(atlas, model, layer)


def thin(rows: list, most: int) -> list:
    """At most ``most`` evenly spaced rows, first and last included (training curves)."""
    if len(rows) <= most:
        return rows
    idx = np.unique(np.linspace(0, len(rows) - 1, most).round().astype(int))
    return [rows[i] for i in idx]


def dictionaries_fingerprint(dcfg: DictionariesConfig, model_fingerprint: str) -> str:
    """Content key of the stage: its config and the recorded activations it learns from."""
    blob = json.dumps([dcfg.model_dump(mode="json"), model_fingerprint], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stored_summary(atlas: Atlas, model: str, layer: int) -> dict[str, dict]:
    """The stage's result as stored: every run's metrics, every steering result's fit."""
    runs = atlas.dictionary_overview(model).get(layer, {}).get("runs", {})
    steer = {f"steering/{k}": {"alpha_rel": r.alpha_rel, "kl": r.kl, "converged": r.converged}
             for k, r in atlas.steering(model, layer).items()}  # fmt: skip
    return runs | steer
