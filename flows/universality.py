"""The universality stage at the reference study's scale, in two passes over the tokens.

1. **layers** (token-parallel units: contiguous shard ranges): every compared layer's
   within-layer covariance, merged in range order, then per (model, layer) its mean, ``M2``,
   dead mask and the rotation baseline's ``diag(QᵀCQ)`` (``ops.universality.rotation_stats``).
   A seed family records its neuron statistics in this same pass (one forward per member).
2. **pairs** (one unit per tile group of ``ops.universality.plan``): a worker holds its
   tiles' co-moments over **all** shards (one GEMM per tile and batch), checkpoints them on
   the configured interval, and finalises each tile where it lives, a layer of rows at a
   time. Only O(neurons) results go back; the full r matrix is written chunk by chunk when
   ``keep_full``.

The plan (state per worker, checkpoint size, forwards, GEMM flops) is logged before any work
and stored in the atlas; one that can never fit fails before a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task

from flows.config import JobConfig, JobConfigError, ModelConfig, UniversalityConfig
from flows.engine import Ledger, run_units
from flows.runtime import runtime_for
from flows.stage import Shard, Span, Stage, Unit
from flows.statistics import note_speed, record_merge
from flows.tasks import TASK
from ops.correlation import CoMoments, FamilyMoments, merge_comoments
from ops.engine import Consumer, NeuronStats, TileMoments
from ops.plan import Plan, default_budget, device_budget, plan
from ops.stats import HistSpec, hist_spec, stack_partials
from ops.universality import (
    LayerMoments,
    TileResult,
    assemble,
    compare_groups,
    finalize_tile,
    overview,
    own_moments,
    rotation,
    rotation_seed,
    rotation_stats,
    summarise,
)
from storage.atlas import Atlas
from storage.store import Store

WORK = "_universality"
LAYERS, TILES = f"{WORK}/layers", f"{WORK}/tiles"


@dataclass(frozen=True)
class Shapes:
    """What both passes need to know of the compared models, decided by the driver."""

    names: list[str]
    layers: list[list[int]]  # compared layers per model
    d: list[int]
    seed: int
    matmul_dtype: str
    flush_tokens: int
    keep_full: bool


def _dtype(shapes: Shapes, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        if shapes.matmul_dtype not in ("auto", "float32"):
            raise JobConfigError(f"field 'universality.matmul_dtype': {shapes.matmul_dtype} "
                                 "products are for CUDA workers only")  # fmt: skip
        return torch.float32
    return getattr(torch, "bfloat16" if shapes.matmul_dtype == "auto" else shapes.matmul_dtype)


@dataclass
class _Held:
    """A unit's state on its worker: the accumulator and the consumer feeding it."""

    acc: FamilyMoments

    @property
    def consumers(self) -> list[Consumer]:
        return [TileMoments(self.acc)]


def _open(shapes: Shapes, tiles_of: Any, ctx: Shard, unit: Unit) -> _Held:
    dev = ctx.device
    flush = shapes.flush_tokens if dev.type == "cuda" else None
    layers = dict(enumerate(shapes.layers))
    d = dict(enumerate(shapes.d))
    return _Held(FamilyMoments(tiles_of(unit), layers, d, dev, _dtype(shapes, dev), flush))


def _identity(unit: Unit, held: _Held) -> np.ndarray:
    """What a checkpoint is of: the unit's shards and tiles (a run resumed under another plan
    or worker count has units of the same names holding other work)."""
    text = repr((unit.key, unit.shards, held.acc.tiles, held.acc.sites))
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)


def _restore(ctx: Shard, unit: Unit, held: _Held) -> int:
    cp = ctx.atlas.read_checkpoint(f"{WORK}/ckpt/{unit.key}")
    if cp is None:
        return 0
    raw, cursor = cp
    if not np.array_equal(raw.pop("identity", None), _identity(unit, held)):
        return 0  # another plan's: start this unit afresh (the next checkpoint replaces it)
    held.acc.load_raw(raw)
    return cursor


def _save(ctx: Shard, unit: Unit, held: _Held, cursor: int) -> None:
    ctx.atlas.write_checkpoint(f"{WORK}/ckpt/{unit.key}",
                               held.acc.raw() | {"identity": _identity(unit, held)}, cursor)  # fmt: skip


# ------------------------------------------------------------------ pass 1: layers


def _close_layers(ctx: Shard, unit: Unit, held: _Held) -> dict:
    """A shard range's within-layer co-moments, persisted per range (merged by the driver)."""
    arrays: dict[str, np.ndarray] = {}
    for tile in held.acc.tiles:
        for k, cm in enumerate(own_moments(held.acc, tile)):
            arrays |= {f"{tile.model}.{tile.lo + k}.{f}": v for f, v in cm.to_arrays().items()}
    ctx.atlas.write_partial(f"{WORK}/ranges", unit.spec, arrays)
    return {}


def _merge_layers(
    shapes: Shapes, n_units: int, atlas: Store
) -> dict[tuple[int, int], LayerMoments]:
    """Per (model, position): the ranges' co-moments merged in range order, then the one
    ``d³`` rotation product; persisted for the pair workers."""
    fields = ("n", "mean_a", "mean_b", "m2_a", "m2_b", "c")
    out: dict[tuple[int, int], LayerMoments] = {}
    arrays: dict[str, np.ndarray] = {}
    for m, (name, ls) in enumerate(zip(shapes.names, shapes.layers, strict=True)):
        for p, layer in enumerate(ls):  # a layer at a time: d² floats per range in memory
            keys = [f"{m}.{p}.{f}" for f in fields]
            cm = merge_comoments([CoMoments.from_arrays(dict(zip(fields, atlas.read_partial(
                f"{WORK}/ranges", u, keys).values(), strict=True))) for u in range(n_units)])  # fmt: skip
            q = rotation(shapes.d[m], rotation_seed(shapes.seed, name, layer))
            out[(m, p)] = lm = rotation_stats(cm, q)
            arrays |= {f"{m}.{p}.{f}": v for f, v in lm.to_arrays().items()}
    atlas.write_partial(LAYERS, 0, arrays)
    return out


def _read_layers(atlas: Store, shapes: Shapes) -> dict[tuple[int, int], LayerMoments]:
    arrays = atlas.read_partial(LAYERS, 0)
    return {(m, p): LayerMoments.from_arrays({f: arrays[f"{m}.{p}.{f}"]
                                              for f in ("n", "mean", "m2", "dead", "m2_rot")})
            for m, ls in enumerate(shapes.layers) for p in range(len(ls))}  # fmt: skip


# ------------------------------------------------------------------ pass 2: pairs


def _close_pairs(shapes: Shapes, tile_ids: dict, ctx: Shard, unit: Unit, held: _Held) -> dict:
    """Finalise the unit's tiles where their state lives; persist their O(neuron) results."""
    own = _read_layers(ctx.atlas, shapes)

    def rot(m: int, p: int) -> torch.Tensor:  # made on demand: each is d² floats
        return rotation(
            shapes.d[m], rotation_seed(shapes.seed, shapes.names[m], shapes.layers[m][p])
        )

    for tile in held.acc.tiles:
        a, b = shapes.names[tile.a], shapes.names[tile.b]
        da, db = shapes.d[tile.a], shapes.d[tile.b]
        for item in finalize_tile(held.acc, tile, shapes.layers, own, rot, shapes.keep_full):
            if isinstance(item, TileResult):
                ctx.atlas.write_partial(TILES, tile_ids[tile], _tile_arrays(item))
            else:  # a block of rows of r: a's rows of a--b, and b--a's columns
                pa, r0, r = item
                ctx.atlas.write_pair_corr(a, b, pa * da + r0, 0, r)
                for pb in range(len(shapes.layers[tile.b])):
                    ctx.atlas.write_pair_corr(b, a, pb * db, pa * da + r0,
                                              np.ascontiguousarray(r[:, pb * db : (pb + 1) * db].T))  # fmt: skip
    return {}


def _close_range(ctx: Shard, unit: Unit, held: _Held) -> dict:
    """A shard range of a group: its tiles' centred co-moments, merged where the group is
    finalised (``_restore_ranges``)."""
    arrays = {f"{i}.{f}": v for i, tile in enumerate(held.acc.tiles)
              for f, v in held.acc.pair_moments(tile).to_arrays().items()}  # fmt: skip
    group, part = unit.spec
    ctx.atlas.write_partial(f"{WORK}/parts/g{group}", part, arrays)
    return {}


def _restore_ranges(split: int, ctx: Shard, unit: Unit, held: _Held) -> int:
    """A group's state: its ranges' co-moments merged in range order (nothing left to feed)."""
    fields = ("n", "mean_a", "mean_b", "m2_a", "m2_b", "c")
    merged: dict = {}
    for r in range(split):
        part = ctx.atlas.read_partial(f"{WORK}/parts/g{unit.spec[0]}", r)
        for i, tile in enumerate(held.acc.tiles):
            cm = CoMoments.from_arrays({f: part[f"{i}.{f}"] for f in fields})
            merged[tile] = cm if tile not in merged else merged[tile].merge(cm)
    held.acc.load_moments(merged)
    return 0


def _tile_arrays(res: TileResult) -> dict[str, np.ndarray]:
    out = {f"fwd.{k}": v for k, v in res.fwd.items()} | {f"rev.{k}": v for k, v in res.rev.items()}
    for pa, (perm, corr) in res.matching.items():
        out[f"match.{pa}.perm"], out[f"match.{pa}.corr"] = perm, corr
    return out


def _tile_result(tile: Any, arrays: dict[str, np.ndarray]) -> TileResult:
    fwd = {k[4:]: v for k, v in arrays.items() if k.startswith("fwd.")}
    rev = {k[4:]: v for k, v in arrays.items() if k.startswith("rev.")}
    matching = {int(k.split(".")[1]): (arrays[k], arrays[k[: -len("perm")] + "corr"])
                for k in arrays if k.startswith("match.") and k.endswith(".perm")}  # fmt: skip
    return TileResult(tile, fwd, rev, matching)


# ------------------------------------------------------------------ the driver


def _no_stats(_shard: Shard) -> list[Consumer]:
    return []


def _no_persist(_shard: Shard, _consumers: list[Consumer]) -> dict:
    return {}


def correlate(job: JobConfig, models: list[ModelConfig], cfg: UniversalityConfig,
              layers: list[list[int]], d: list[int], key: str, ledger: Ledger | None,
              stats: tuple[Any, Any] | None = None, first_name: str = "universality/layers"
              ) -> dict:  # fmt: skip
    """Both passes and the merge; returns the family summary. ``stats`` = (build, persist):
    per-shard consumers recorded in the first pass (a family's neuron statistics)."""
    atlas = Store.open(job.atlas)
    stored = atlas.attrs.get("universality", {})
    if stored.get("key") == key and atlas.done("universality/pairs").get("complete"):
        return {"skipped": True, **stored}
    with runtime_for(job.resources) as rt:  # the job's workers, for all three passes
        gpus, res = rt.gpus, job.resources
        if gpus and cfg.memory_gb is None:  # what the workers' devices hold, read from them
            budget = device_budget(rt.call(_device_memory))
        else:
            budget = default_budget(cfg.memory_gb, res.workers, gpus)
        return _correlate(job, models, cfg, layers, d, key, ledger, stats, first_name, gpus,
                          budget)  # fmt: skip


def _device_memory(device: str = "cuda") -> int:
    """Bytes of memory of the device a worker runs on."""
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def _correlate(job: JobConfig, models: list[ModelConfig], cfg: UniversalityConfig,
               layers: list[list[int]], d: list[int], key: str, ledger: Ledger | None,
               stats: tuple[Any, Any] | None, first_name: str, gpus: bool, budget: int
               ) -> dict:  # fmt: skip
    log = get_run_logger()
    atlas = Store.open(job.atlas)
    res = job.resources
    names = [m.name for m in models]
    the_plan = plan(layers, d, res.workers, budget, flush=gpus)
    log.info("%s", the_plan.describe(names))
    atlas.touch(universality_plan=the_plan.to_dict())
    shapes = Shapes(names, layers, d, cfg.seed, cfg.matmul_dtype, cfg.flush_tokens, cfg.keep_full)
    every_s = cfg.checkpoint_minutes * 60 if cfg.checkpoint_minutes else None
    n_shards = len(atlas.shard_ranges())
    common = dict(models=models, batch_size=job.record.batch_size)

    # pass 1: contiguous shard ranges, one per worker
    bounds = np.linspace(0, n_shards, min(res.workers, n_shards) + 1).round().astype(int)
    ranges = [Unit(f"r{i}", tuple(range(lo, hi)), i)
              for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)) if hi > lo]  # fmt: skip
    own_tiles = [t for g in the_plan.own for t in g]
    build, persist = stats or (_no_stats, _no_persist)
    first = Stage(name=first_name, key=job.fingerprint(key, "layers", len(ranges)),
                  build=build, persist=persist, description="layer covariances",
                  span=Span(open=partial(_open, shapes, lambda _u: own_tiles), restore=_restore,
                            save=_save, close=_close_layers, every_shards=cfg.checkpoint_shards,
                            every_s=every_s), **common)  # fmt: skip
    first_done = atlas.done(first.name)
    acct = run_units(first, job.atlas, ranges, res, ledger).accounting
    if first_done.get("fingerprint") == first.key and first_done.get("complete"):
        own = _read_layers(atlas, shapes)
    else:
        own = _merge_layers(shapes, len(ranges), atlas)
        atlas.mark(first.name, first.key, complete=True)
        atlas.drop_partials(f"{WORK}/ranges")

    # pass 2: the tile groups; with fewer groups than workers, each group's shards are split
    # into ranges (token-parallel) whose states are merged, in range order, where it is
    # finalised
    groups = the_plan.groups
    tile_ids = {t: i for i, t in enumerate(t for g in groups for t in g)}
    split = min(max(1, res.workers // len(groups)), n_shards)
    cuts = np.linspace(0, n_shards, split + 1).round().astype(int)
    units = [Unit(f"g{i}" if split == 1 else f"g{i}r{r}", tuple(range(cuts[r], cuts[r + 1])), (i, r))
             for i in range(len(groups)) for r in range(split)]  # fmt: skip
    pair_key = job.fingerprint(key, "pairs", str(split),
                               json.dumps(the_plan.to_dict()["groups"]))  # fmt: skip
    if cfg.keep_full and atlas.done("universality/pairs").get("fingerprint") != pair_key:
        for i, j in [(i, j) for g in groups for t in g for (i, j) in ((t.a, t.b), (t.b, t.a))]:
            atlas.init_pair_corr(names[i], names[j], (len(layers[i]) * d[i], len(layers[j]) * d[j]),
                                 (d[i], d[j]), cfg.full_dtype)  # fmt: skip
    finalise = partial(_close_pairs, shapes, tile_ids)
    tiles_of = lambda u: groups[u.spec[0]]  # noqa: E731  (spec: (group, range))
    second = Stage(name="universality/pairs", key=pair_key, build=_no_stats,
                   persist=_no_persist, description="pair co-moments",
                   span=Span(open=partial(_open, shapes, tiles_of), restore=_restore, save=_save,
                             close=finalise if split == 1 else _close_range,
                             every_shards=cfg.checkpoint_shards, every_s=every_s), **common)  # fmt: skip
    run_units(second, job.atlas, units, res, ledger)
    if split > 1:  # one unit per group, no shards: merge its ranges, finalise
        third = Stage(name="universality/finalise", key=pair_key, build=_no_stats,
                      persist=_no_persist, description="finalise tiles",
                      span=Span(open=partial(_open, shapes, tiles_of),
                                restore=partial(_restore_ranges, split), save=_save,
                                close=finalise, every_s=None), **common)  # fmt: skip
        run_units(third, job.atlas, [Unit(f"g{i}", (), (i, 0)) for i in range(len(groups))], res,
                  ledger)  # fmt: skip
    atlas.mark(second.name, second.key, complete=True)
    out = _merge(key, cfg, shapes, the_plan, own, tile_ids, atlas)
    return out | {"first_pass": acct}


def _merge(key: str, cfg: UniversalityConfig, shapes: Shapes, the_plan: Plan, own: dict,
           tile_ids: dict, atlas: Store) -> dict:  # fmt: skip
    names = shapes.names
    results = [_tile_result(t, atlas.read_partial(TILES, i)) for t, i in tile_ids.items()]
    n_layers = [atlas.model_attrs(n)["n_layers"] for n in names]
    pair_out = assemble(len(names), shapes.layers, shapes.d, n_layers, results)
    summary = summarise(names, shapes.layers, pair_out, own, cfg.threshold)
    tokens = own[(0, 0)].n
    meta = {"baseline": cfg.baseline, "rotation_seed": cfg.seed, "threshold": cfg.threshold,
            "tokens": tokens}  # fmt: skip
    for (a, b), out in pair_out.items():
        atlas.write_pair(names[a], names[b], out["arrays"], out["matching"],
                         meta | {"layers": shapes.layers[a], "partner_layers": shapes.layers[b]})  # fmt: skip
    frac: dict[str, dict[int, float]] = {}
    for (m, L), arrays in summary.items():
        atlas.write_summary(names[m], L, arrays, meta)
        frac.setdefault(names[m], {})[L] = float(arrays["universal"].mean())
    features = {(m, L): {k: v for k, v in atlas.stats(names[m], L).items()
                         if k in ("frac_active", "kurt", "skew")} | atlas.props(names[m], L)
                for (m, L) in summary}  # fmt: skip
    result = {**overview(summary), "per_layer": frac, "tokens": tokens, "key": key,
              "plan": the_plan.to_dict(), "comparison": compare_groups(summary, features)}  # fmt: skip
    atlas.touch(universality=result)
    atlas.drop_partials(WORK)
    return result


# ------------------------------------------------------------------ tasks


def _family_consumers(k: int, spec: HistSpec, shard: Shard) -> list[Consumer]:
    """Every layer's statistics of every member (recorded in the first pass)."""
    return [NeuronStats((m, L), lm.d_mlp, k, spec, shard.device)
            for m, lm in enumerate(shard.models) for L in range(lm.n_layers)]  # fmt: skip


def _family_persist(names: list[str], shard: Shard, consumers: list[Consumer]) -> dict:
    for m, name in enumerate(names):
        parts = [c.state() for c in consumers if isinstance(c, NeuronStats) and c.sites[0][0] == m]
        shard.atlas.write_partial(name, shard.index, stack_partials(parts))
    return {}


@task(name="record-family", **TASK)
def record_family(job: JobConfig, cfg: UniversalityConfig, preps: list[dict],
                  ledger: Ledger | None = None) -> dict:  # fmt: skip
    """Record every model of a family (``job``) and correlate their neurons: the members'
    statistics come from the first universality pass (one forward per member and batch)."""
    models = list(job.models)
    if any(p["layers"] != list(range(p["n_layers"])) for p in preps):
        raise JobConfigError("a family is recorded and compared over all of its layers")
    r = job.record
    at = Atlas.open(job.atlas)
    key = job.fingerprint(
        "family", cfg.model_dump_json(), *(at.data_key(p["fingerprint"]) for p in preps)
    )
    stats = (partial(_family_consumers, r.topk, hist_spec(r.hist_bins, r.hist_min, r.hist_max)),
             partial(_family_persist, [m.name for m in models]))  # fmt: skip
    recorded = all(Store.open(job.atlas).model_group(m.name).attrs.get("complete") for m in models)
    out = correlate(job, models, cfg, [p["layers"] for p in preps], [p["d_mlp"] for p in preps],
                    key, ledger, stats=stats, first_name="record+layers")  # fmt: skip
    rows = {}
    if not recorded:
        # opened now: a group opened before correlate() wrote its attributes would write
        # its stale copy of them back
        atlas = Store.open(job.atlas)
        rows = {
            m.name: record_merge(job, m, prep, atlas) for m, prep in zip(models, preps, strict=True)
        }
        for m in models:
            atlas.drop_partials(m.name)
        note_speed(job.atlas, models, out.get("first_pass"))
    _log(out)
    return {"merged": not out.get("skipped"), "models": rows, **out}


@task(name="universality", **TASK)
def universality(job: JobConfig, models: list[ModelConfig], cfg: UniversalityConfig,
                 ledger: Ledger | None = None) -> dict:  # fmt: skip
    """Correlate every compared neuron of ``models`` with every one of the others."""
    atlas = Atlas.open(job.atlas)
    attrs = [atlas.model_attrs(m.name) for m in models]
    key = job.fingerprint("universality", cfg.model_dump_json(),
                          *(atlas.data_key(a["fingerprint"]) for a in attrs))  # fmt: skip
    layers = [atlas.layers(m.name) for m in models]
    out = correlate(job, models, cfg, layers, [a["d_mlp"] for a in attrs], key, ledger)
    _log(out)
    return {"merged": not out.get("skipped"), **out}


def _log(out: dict) -> None:
    if out.get("skipped"):
        return
    get_run_logger().info("universal neurons: %.2f%% (mean max corr %.3f, rotation baseline %.3f)",
                          100 * out["universal_frac"], out["mean_max_corr"], out["baseline"])  # fmt: skip
