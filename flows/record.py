"""Recording: Ray ``ShardWorker`` actors and the driver that feeds them corpus shards.

The driver runs inside a Prefect task. It starts ``resources.workers`` actors (each
loads the model once; one GPU each when Ray sees GPUs, one torch thread each on CPU),
keeps at most ``inflight_per_worker`` shards queued per actor, and records each shard
in the manifest as soon as its partial is persisted. Workers read their tokens from
the atlas and write their partials and sample rows themselves, so only shard indices
and small summaries cross process boundaries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import ray
import torch

from flows.config import JobConfig, ModelConfig, ResourcesConfig
from ops.models import LoadedModel, capture_mlp, forward_until, load_model
from ops.stats import NeuronAccumulator, StatsPartial, hist_spec
from storage.atlas import Atlas


def _partials_to_arrays(parts: Sequence[StatsPartial]) -> dict[str, np.ndarray]:
    """Stack one StatsPartial per layer into arrays with a leading layer axis."""
    out = {name: np.stack([getattr(p, name) for p in parts]) for name in StatsPartial.ARRAYS}
    out["n"] = np.asarray(parts[0].n, dtype=np.int64)
    return out


def attention_mask(mask: np.ndarray) -> np.ndarray:
    """Attend to every position up to a row's last recorded one (BOS included, right pads not).

    ``mask`` excludes BOS as well as padding; padding is always at the end of a row.
    """
    return np.flip(np.logical_or.accumulate(np.flip(mask, 1), axis=1), 1).astype(np.int64)


def worker_model(model: ModelConfig, device: str | None = None) -> LoadedModel:
    """A job model loaded for recording in a worker (no tokenizer, no per-load progress bar:
    one bar per worker per load is noise in the driver)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_model(model.source, dtype=model.dtype, device=device, revision=model.revision,
                      with_tokenizer=False)  # fmt: skip


class ShardRecorder:
    """Everything a worker does for one model; plain Python so tests and benches can call it."""

    def __init__(self, model: ModelConfig, job: JobConfig, atlas_path: str, layers: list[int],
                 sample_layers: list[int], device: str | None = None):  # fmt: skip
        self.name = model.name
        self.loaded = worker_model(model, device)
        self.atlas = Atlas.open(atlas_path, mode="r+")
        self.layers = layers
        self.sample_layers = [layer for layer in sample_layers if layer in layers]
        self.rec = job.record
        self.spec = hist_spec(job.record.hist_bins, job.record.hist_min, job.record.hist_max)
        self.per_shard = self.atlas.sample_rows_per_shard()
        self.sample_positions = self.atlas.corpus["sample_positions"][...]

    def record(self, shard: int) -> dict[str, Any]:
        """Record one shard: stream its batches through the model, persist the partial."""
        t0 = time.perf_counter()
        dev = self.loaded.device
        d = self.loaded.d_mlp
        accs = {L: NeuronAccumulator(d, self.rec.topk, self.spec, dev) for L in self.layers}
        sample_pos = self.sample_positions[shard * self.per_shard : (shard + 1) * self.per_shard]
        samples = {L: np.zeros((self.per_shard, d), np.float16) for L in self.sample_layers}
        state: dict[str, Any] = {}

        def on_act(layer: int, act: torch.Tensor) -> None:
            acc = accs.get(layer)
            if acc is None:
                return
            flat = act.reshape(-1, act.shape[-1])
            acc.update_rows(flat, state["rows"], state["positions"])
            if layer in samples and state["sample_src"].numel():
                samples[layer][state["sample_dst"]] = (
                    flat.index_select(0, state["sample_src"]).to(torch.float16).cpu().numpy()
                )

        last = max(self.layers)
        n_tok = 0
        with capture_mlp(self.loaded, self.layers, on_act):
            for ids, attn, rows, pos in shard_batches(self.atlas, shard, self.rec.batch_size):
                state["rows"] = torch.from_numpy(rows).to(dev)
                state["positions"] = torch.from_numpy(pos).to(dev)
                # sample rows that fall in this batch (its flat positions are [lo, lo + ids.numel()))
                lo = int(pos[0] - rows[0])
                hit = np.flatnonzero((sample_pos >= lo) & (sample_pos < lo + ids.numel()))
                state["sample_src"] = torch.from_numpy(sample_pos[hit] - lo).to(dev)
                state["sample_dst"] = hit
                n_tok += len(rows)
                forward_until(self.loaded, ids, attn, last)
        parts = [accs[L].partial() for L in self.layers]
        self.atlas.write_partial(self.name, shard, _partials_to_arrays(parts))
        for L, rows_ in samples.items():
            self.atlas.write_sample(self.name, L, shard, rows_)
        dt = time.perf_counter() - t0
        return {"shard": shard, "tokens": n_tok, "seconds": dt, "pid": os.getpid()}


@ray.remote
class ShardWorker:
    """A Ray actor holding a recorder (and so its models); records shards on request.

    ``recorder_cls`` is :class:`ShardRecorder` for one model's statistics, or
    ``flows.universality.FamilyRecorder`` for cross-model co-moments.
    """

    def __init__(self, recorder_cls: type, *args: Any, threads: int | None = None, **kwargs: Any):
        if threads:
            torch.set_num_threads(threads)
        self.recorder = recorder_cls(*args, **kwargs)

    def record(self, shard: int) -> dict[str, Any]:
        return self.recorder.record(shard)

    def ready(self) -> int:
        return os.getpid()


def ensure_ray(address: str | None, workers: int) -> None:
    """Connect to ``address``/``$RAY_ADDRESS``, or start an in-process local cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=True)  # fmt: skip


def iter_shards(
    recorder_cls: type,
    args: tuple,
    kwargs: dict[str, Any],
    shards: Sequence[int],
    resources: ResourcesConfig,
    ordered: bool = False,
) -> Iterator[dict[str, Any]]:
    """Feed ``shards`` to ``resources.workers`` actors, each holding a ``recorder_cls(*args)``,
    and yield each result as it lands (``ordered``: in the order of ``shards``).

    The recorder needs ``record(shard) -> dict``. At most ``inflight_per_worker`` shards are
    queued per actor, and when ordered, completed results waiting for an earlier shard count
    against the same budget, so a consumer of large results (live activations) holds a bounded
    number of them. Closing the generator stops the actors.
    """
    ensure_ray(resources.ray_address, resources.workers)
    gpus = resources.gpus
    if gpus == "auto":
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
    n_workers = max(1, min(resources.workers, len(shards)))
    opts: dict[str, Any] = {
        "max_restarts": resources.max_restarts,
        "max_task_retries": resources.max_restarts,  # a shard is idempotent: safe to redo
        "num_cpus": 1,
        "num_gpus": 1 if gpus else 0,
    }
    kw = {**kwargs, "device": "cuda" if gpus else "cpu", "threads": None if gpus else 1}
    actors = [
        ShardWorker.options(**opts).remote(recorder_cls, *args, **kw) for _ in range(n_workers)
    ]
    try:
        ray.get([a.ready.remote() for a in actors])  # surface load errors before queueing work
        budget = n_workers * resources.inflight_per_worker
        todo = list(enumerate(shards))
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (actor, index in shards)
        load = [0] * n_workers
        waiting: dict[int, dict[str, Any]] = {}  # ordered: done, waiting for an earlier shard
        next_out = 0
        while todo or inflight:
            for i, actor in enumerate(actors):
                while (todo and load[i] < resources.inflight_per_worker
                       and len(inflight) + len(waiting) < budget):  # fmt: skip
                    j, shard = todo.pop(0)
                    inflight[actor.record.remote(shard)] = (i, j)
                    load[i] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                i, j = inflight.pop(ref)
                load[i] -= 1
                out = ray.get(ref)
                if not ordered:
                    yield out
                    continue
                waiting[j] = out
                while next_out in waiting:
                    yield waiting.pop(next_out)
                    next_out += 1
    finally:
        for a in actors:
            ray.kill(a)


def run_shards(
    recorder_cls: type,
    args: tuple,
    kwargs: dict[str, Any],
    shards: Sequence[int],
    resources: ResourcesConfig,
    on_done: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Record ``shards`` (see :func:`iter_shards`); ``on_done`` runs in the driver as each
    shard lands, in completion order (merges later use shard order)."""
    results = []
    for out in iter_shards(recorder_cls, args, kwargs, shards, resources):
        results.append(out)
        on_done(out)
    return results


def shard_batches(atlas: Atlas, shard: int, batch_size: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]]:  # fmt: skip
    """A shard's batches with at least one recorded token: ``(input_ids, attention_mask,
    rows, positions)``, ``rows`` indexing the flattened batch, ``positions`` the corpus."""
    start, _ = atlas.shard_ranges()[shard]
    tokens, mask = atlas.read_shard(shard)
    seq_len = tokens.shape[1]
    for a in range(0, len(tokens), batch_size):
        m = mask[a : a + batch_size]
        rows = np.flatnonzero(m.reshape(-1))
        if len(rows):
            yield (torch.from_numpy(tokens[a : a + batch_size].astype(np.int64)),
                   torch.from_numpy(attention_mask(m)), rows, (start + a) * seq_len + rows)  # fmt: skip


class ActivationRecorder:
    """Returns one layer's MLP activations at every recorded position of a shard, in corpus
    order, as float16 ``[tokens, d_mlp]`` (for live SAE training: no activation dump)."""

    def __init__(self, model: ModelConfig, atlas_path: str, layer: int, batch_size: int,
                 device: str | None = None):  # fmt: skip
        self.loaded = worker_model(model, device)
        self.atlas = Atlas.open(atlas_path)
        self.layer, self.batch_size = layer, batch_size

    def record(self, shard: int) -> dict[str, Any]:
        out: list[torch.Tensor] = []
        rows: dict[str, torch.Tensor] = {}

        def on_act(_layer: int, act: torch.Tensor) -> None:
            flat = act.reshape(-1, act.shape[-1])
            out.append(flat.index_select(0, rows["rows"]).to(torch.float16).cpu())

        with capture_mlp(self.loaded, [self.layer], on_act):
            for ids, attn, r, _ in shard_batches(self.atlas, shard, self.batch_size):
                rows["rows"] = torch.from_numpy(r).to(self.loaded.device)
                forward_until(self.loaded, ids, attn, self.layer)
        acts = torch.cat(out).numpy() if out else np.zeros((0, self.loaded.d_mlp), np.float16)
        return {"shard": shard, "acts": acts, "tokens": len(acts)}


def drive(
    job: JobConfig,
    model: ModelConfig,
    atlas_path: str,
    layers: list[int],
    sample_layers: list[int],
    shards: Sequence[int],
    on_done: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Record ``shards`` of one model on Ray workers."""
    return run_shards(ShardRecorder, (model, job, atlas_path, layers, sample_layers), {}, shards,
                      job.resources, on_done)  # fmt: skip
