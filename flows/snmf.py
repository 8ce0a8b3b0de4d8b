"""SNMF over the job's workers: the tokens of a layer's stored sample spread over them
(shard-aligned), each holding its shards' ``A_s`` and ``Y_s``; per iteration the driver sums
the shard reductions in shard order and solves for ``Z`` (``ops.snmf.run`` is the one loop,
in one process or over workers, so the distributed result equals the single-process one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flows.config import JobConfig, SNMFRunConfig
from flows.runtime import Held, Runtime, get
from ops import snmf as snmf_ops
from storage.atlas import Atlas


def _to(x: Any, device: torch.device | str) -> Any:
    """Tensors in ``x`` (nested in lists/tuples) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    return x


class SNMFShards:
    """Held on a job worker: some shards' sample rows (as ``A_s [d, T_s]``) and their ``Y_s``
    on the worker's device (its GPU where workers take GPUs); it reads only its own shards'
    rows. Only ``[d, k]``-sized data crosses to the driver, on the host."""

    def __init__(self, atlas_path: str, model: str, layer: int, shards: list[int],
                 cfg: snmf_ops.SNMFConfig, device: str = "cpu"):  # fmt: skip
        self.device = torch.device(device)  # (a CPU Ray worker runs one thread already)
        atlas = Atlas.open(atlas_path)
        self.parts = {s: torch.from_numpy(a.T.copy()).to(self.device)
                      for s, a, _ in atlas.sample(model, layer, shards)}  # fmt: skip
        self.local = snmf_ops.LocalShards(list(self.parts.values()), cfg)
        self.order = list(self.parts)

    def call(self, method: str, *args: Any) -> Any:
        out = getattr(self.local, method)(*_to(args, self.device))
        return _to(out, "cpu")


class WorkerShards:
    """The ``ops.snmf`` shard interface over :class:`SNMFShards` held on workers, in shard
    order."""

    def __init__(self, actors: list[Held], counts: list[int]):
        self.actors, self.counts = actors, counts

    def _all(self, method: str, *args: Any) -> list:
        outs = get([a.submit("call", method, *args) for a in self.actors])
        return [x for out in outs for x in out]  # actors hold consecutive shard ranges

    def n_tokens(self) -> int:
        return sum(self.counts)

    def columns(self, idx: np.ndarray) -> torch.Tensor:
        bounds = np.cumsum([0] + self.counts)
        cols = []
        for i, a in enumerate(self.actors):
            mine = idx[(idx >= bounds[i]) & (idx < bounds[i + 1])] - bounds[i]
            cols.append(get(a.submit("call", "columns", mine)))
        return torch.cat(cols, dim=1)

    def init(self, z: torch.Tensor) -> None:
        get([a.submit("call", "init", z) for a in self.actors])

    def reductions(self) -> list:
        return self._all("reductions")

    def step(self, z: torch.Tensor, scale: torch.Tensor) -> list[float]:
        return self._all("step", z, scale)

    def norms(self) -> list[float]:
        return self._all("norms")

    def keep_best(self) -> None:
        get([a.submit("call", "keep_best") for a in self.actors])

    def best_y(self) -> list[torch.Tensor]:
        return self._all("best_y")


def fit_snmf(rt: Runtime, job: JobConfig, model: str, layer: int, run: SNMFRunConfig,
             atlas: Atlas) -> snmf_ops.SNMFResult:  # fmt: skip
    """SNMF with the tokens spread over the job's workers (shard-aligned)."""
    cfg = run.snmf_config()
    counts = atlas.sample_counts()
    n = len(rt.workers(job.resources.workers))
    groups = [g.tolist() for g in np.array_split(np.array(sorted(counts)),
                                                 min(n, len(counts)))]  # fmt: skip
    held = [rt.hold(SNMFShards, job.atlas, model, layer, g, cfg, worker=i)
            for i, g in enumerate(groups)]  # fmt: skip
    try:
        backend = WorkerShards(held, [sum(counts[s] for s in g) for g in groups])
        return snmf_ops.run(backend, cfg)
    finally:
        for h in held:
            h.release()
