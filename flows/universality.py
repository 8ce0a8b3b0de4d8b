"""Universality stage: co-moments of every neuron pair across models, then partners and labels.

A Ray worker holding a ``FamilyRecorder`` holds every compared model (they share a tokenizer and are
fed the same shard), and accumulates per shard, per layer pair, the co-moments of each
model pair plus each model's within-layer covariance (for the rotation baseline). The
driver persists nothing itself: workers write per-shard partials; the merge task folds
them in shard order and computes, block by block, best partners, baselines, matchings
and the per-neuron family summary.
"""

from __future__ import annotations

import itertools
import os
import time
import zlib
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from flows.config import JobConfig, ModelConfig, UniversalityConfig
from flows.record import attention_mask, run_shards, worker_model
from flows.tasks import TASK
from ops.correlation import (
    BestPartners,
    CoMomentAccumulator,
    CoMoments,
    constant,
    match,
    random_rotation,
    rotated_pearson,
)
from ops.models import capture_mlp, forward_until
from storage.atlas import Atlas, AtlasError

WORK = "_universality"


def _pairs(n: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(n), 2))


class FamilyRecorder:
    """Runs every compared model on a shard and accumulates their co-moments."""

    def __init__(self, models: list[ModelConfig], atlas_path: str, batch_size: int,
                 device: str | None = None):  # fmt: skip
        self.models = [worker_model(m, device) for m in models]
        self.atlas = Atlas.open(atlas_path, mode="r+")
        self.batch_size = batch_size

    def record(self, shard: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        tokens, mask = self.atlas.read_shard(shard)
        dev = self.models[0].device
        n_layers = [m.n_layers for m in self.models]
        d = [m.d_mlp for m in self.models]
        cross = {
            (p, la, lb): CoMomentAccumulator(d[i], d[j], dev)
            for p, (i, j) in enumerate(_pairs(len(self.models)))
            for la in range(n_layers[i])
            for lb in range(n_layers[j])
        }
        own = {(m, L): CoMomentAccumulator(d[m], d[m], dev)
               for m in range(len(self.models)) for L in range(n_layers[m])}  # fmt: skip
        n_tok = 0
        for a in range(0, len(tokens), self.batch_size):
            m_b = mask[a : a + self.batch_size]
            rows = torch.from_numpy(np.flatnonzero(m_b.reshape(-1))).to(dev)
            if rows.numel() == 0:
                continue
            ids = torch.from_numpy(tokens[a : a + self.batch_size].astype(np.int64))
            attn = torch.from_numpy(attention_mask(m_b))
            acts: list[dict[int, torch.Tensor]] = []
            for lm in self.models:
                got: dict[int, torch.Tensor] = {}

                def keep(
                    layer: int, act: torch.Tensor, got: dict = got, rows: torch.Tensor = rows
                ) -> None:
                    got[layer] = act.reshape(-1, act.shape[-1]).index_select(0, rows).float()

                with capture_mlp(lm, range(lm.n_layers), keep):
                    forward_until(lm, ids, attn, lm.n_layers - 1)
                acts.append(got)
            for (p, la, lb), acc in cross.items():
                i, j = _pairs(len(self.models))[p]
                acc.update(acts[i][la], acts[j][lb])
            for (m, L), acc in own.items():
                acc.update(acts[m][L], acts[m][L])
            n_tok += int(rows.numel())
        arrays: dict[str, np.ndarray] = {}
        for (p, la, lb), acc in cross.items():
            for k, v in acc.partial().to_arrays().items():
                arrays[f"p{p}.{la}.{lb}.{k}"] = v
        for (m, L), acc in own.items():
            for k, v in acc.partial().to_arrays().items():
                arrays[f"m{m}.{L}.{k}"] = v
        self.atlas.write_partial(WORK, shard, arrays)
        return {"shard": shard, "tokens": n_tok, "seconds": time.perf_counter() - t0,
                "pid": os.getpid()}  # fmt: skip


def _fold(parts: dict[str, CoMoments], arrays: dict[str, np.ndarray]) -> None:
    """Merge one shard's partial into the running per-block moments (shard order)."""
    blocks: dict[str, dict[str, np.ndarray]] = {}
    for key, v in arrays.items():
        block, field = key.rsplit(".", 1)
        blocks.setdefault(block, {})[field] = v
    for block, a in blocks.items():
        cm = CoMoments.from_arrays(a)
        parts[block] = cm if block not in parts else parts[block].merge(cm)


def rotation_seed(seed: int, model: str, layer: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{model}/{layer}".encode())) % 2**32


def compute_universality(
    names: list[str], n_layers: list[int], d: list[int], moments: dict[str, CoMoments],
    cfg: UniversalityConfig,
) -> tuple[dict, dict]:  # fmt: skip
    """Per directed pair: best partners, baseline, matching; per model: the family summary."""
    rot = {(m, L): random_rotation(d[m], rotation_seed(cfg.seed, names[m], L))
           for m in range(len(names)) for L in range(n_layers[m])}  # fmt: skip
    own = {(m, L): moments[f"m{m}.{L}"] for m in range(len(names)) for L in range(n_layers[m])}
    dead = {(m, L): constant(c.m2_a, c.mean_a, c.n) for (m, L), c in own.items()}
    pair_out: dict[tuple[int, int], dict] = {}
    for p, (i, j) in enumerate(_pairs(len(names))):
        for a, b, flip in ((i, j, False), (j, i, True)):
            best = [BestPartners.empty(d[a]) for _ in range(n_layers[a])]
            base = [BestPartners.empty(d[a]) for _ in range(n_layers[a])]
            perm = np.full((n_layers[a], d[a]), -1, np.int64)
            mcorr = np.full((n_layers[a], d[a]), np.nan)
            full = (
                np.zeros((n_layers[a] * d[a], n_layers[b] * d[b]), np.float32)
                if cfg.keep_full
                else None
            )
            for la in range(n_layers[a]):
                for lb in range(n_layers[b]):
                    cm = moments[f"p{p}.{lb}.{la}"].T if flip else moments[f"p{p}.{la}.{lb}"]
                    r = cm.pearson()
                    best[la].update(r, lb)
                    base[la].update(rotated_pearson(cm, own[(b, lb)].c, rot[(b, lb)]), lb)
                    if la == lb and n_layers[a] == n_layers[b]:
                        perm[la], mcorr[la] = match(r)
                    if full is not None:
                        full[la * d[a] : (la + 1) * d[a], lb * d[b] : (lb + 1) * d[b]] = r
            out = {
                "partner_layer": np.stack([x.layer for x in best]),
                "partner_index": np.stack([x.index for x in best]),
                "max_corr": np.stack([x.max_corr for x in best]),
                "min_corr": np.stack([x.min_corr for x in best]),
                "baseline_max_corr": np.stack([x.max_corr for x in base]),
            }
            if full is not None:
                out["corr"] = full
            pair_out[(a, b)] = {"arrays": out, "matching": {"perm": perm, "corr": mcorr}}
    summary: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for m in range(len(names)):
        others = [o for o in range(len(names)) if o != m]
        for L in range(n_layers[m]):
            mx = np.stack([pair_out[(m, o)]["arrays"]["max_corr"][L] for o in others])
            bl = np.stack([pair_out[(m, o)]["arrays"]["baseline_max_corr"][L] for o in others])
            mean, baseline = mx.mean(0), bl.mean(0)
            excess = mean - baseline
            summary[(m, L)] = {
                "mean_max_corr": mean, "max_max_corr": mx.max(0), "min_max_corr": mx.min(0),
                "baseline": baseline, "excess_corr": excess,
                "universal": (excess > cfg.threshold) & ~dead[(m, L)], "dead": dead[(m, L)],
            }  # fmt: skip
    return pair_out, summary


COMPARED = (("frac_active", "stats"), ("kurt", "stats"), ("skew", "stats"),
            ("vocab_kurt", "props"), ("vocab_skew", "props"), ("w_out_norm", "props"),
            ("cos_in_out", "props"))  # fmt: skip


def compare_groups(atlas: Atlas, names: list[str], summary: dict) -> dict[str, dict[str, float]]:
    """Mean neuron properties of universal vs other live neurons (the seed paper's table)."""
    groups: dict[str, dict[str, list[np.ndarray]]] = {"universal": {}, "non_universal": {}}
    for (m, L), s in summary.items():
        sources = {"stats": atlas.stats(names[m], L), "props": atlas.props(names[m], L)}
        masks = {"universal": s["universal"], "non_universal": ~s["universal"] & ~s["dead"]}
        for feat, where in COMPARED:
            if feat not in sources[where]:
                continue
            v = np.asarray(sources[where][feat], dtype=np.float64)
            for g, mask in masks.items():
                groups[g].setdefault(feat, []).append(v[mask])
    out: dict[str, dict[str, float]] = {}
    for g, feats in groups.items():
        n = int(sum(len(x) for x in next(iter(feats.values()), [])))
        out[g] = {"count": n} | {
            f: float(np.mean(np.concatenate(v))) if n else float("nan") for f, v in feats.items()
        }
    return out


@task(name="universality-record", **TASK)
def record_correlations(job: JobConfig, models: list[ModelConfig], fingerprint: str) -> dict:
    """The Ray driver: every shard through every compared model, co-moments persisted per shard."""
    atlas = Atlas.open(job.atlas, mode="r+")
    stage = "universality/record"
    entry = atlas.done(stage)
    done = set(entry.get("shards", [])) if entry.get("fingerprint") == fingerprint else set()
    shards = [s for s in range(len(atlas.shard_ranges())) if s not in done]
    if not shards:
        return {"shards": 0}
    bar = tqdm(total=len(shards), desc="correlations", unit="shard")

    def on_done(out: dict) -> None:
        atlas.mark(stage, fingerprint, [out["shard"]])
        bar.update(1)

    try:
        run_shards(FamilyRecorder, (models, job.atlas, job.record.batch_size), {}, shards,
                   job.resources, on_done)  # fmt: skip
    finally:
        bar.close()
    return {"shards": len(shards)}


@task(name="universality-merge", **TASK)
def merge_correlations(job: JobConfig, models: list[ModelConfig], cfg: UniversalityConfig,
                       fingerprint: str) -> dict:  # fmt: skip
    log = get_run_logger()
    atlas = Atlas.open(job.atlas, mode="r+")
    if atlas.done("universality/merge").get("fingerprint") == fingerprint:
        return {"merged": False, **atlas.attrs.get("universality", {})}
    n_shards = len(atlas.shard_ranges())
    entry = atlas.done("universality/record")
    missing = sorted(set(range(n_shards)) - set(entry.get("shards", [])))
    if missing or entry.get("fingerprint") != fingerprint:
        raise AtlasError(f"cannot merge correlations: shards {missing[:10]} not recorded")
    moments: dict[str, CoMoments] = {}
    for s in tqdm(range(n_shards), desc="merge correlations", unit="shard"):
        _fold(moments, atlas.read_partial(WORK, s))
    names = [m.name for m in models]
    attrs = [atlas.model_attrs(n) for n in names]
    n_layers = [a["n_layers"] for a in attrs]
    d = [a["d_mlp"] for a in attrs]
    pair_out, summary = compute_universality(names, n_layers, d, moments, cfg)
    tokens = next(iter(moments.values())).n
    meta = {"baseline": cfg.baseline, "rotation_seed": cfg.seed, "threshold": cfg.threshold,
            "tokens": tokens}  # fmt: skip
    for (a, b), out in pair_out.items():
        atlas.write_pair(names[a], names[b], out["arrays"], out["matching"], meta)
    frac = {}
    for (m, L), arrays in summary.items():
        atlas.write_summary(names[m], L, arrays, meta)
        frac.setdefault(names[m], {})[L] = float(arrays["universal"].mean())
    overall = float(np.mean([s["universal"].mean() for s in summary.values()]))
    excess = float(np.mean([s["excess_corr"].mean() for s in summary.values()]))
    base = float(np.mean([s["baseline"].mean() for s in summary.values()]))
    mean_max = float(np.mean([s["mean_max_corr"].mean() for s in summary.values()]))
    result = {"universal_frac": overall, "mean_max_corr": mean_max, "baseline": base,
              "mean_excess_corr": excess, "per_layer": frac, "tokens": tokens,
              "comparison": compare_groups(atlas, names, summary)}  # fmt: skip
    atlas.touch(universality=result)
    atlas.mark("universality/merge", fingerprint, complete=True)
    atlas.drop_partials(WORK)
    log.info("universal neurons: %.2f%% (mean max corr %.3f, rotation baseline %.3f)",
             100 * overall, mean_max, base)  # fmt: skip
    return {"merged": True, **result}
