"""The universality stage: every shard through every compared model in one pass, the
co-moments of every layer pair (``ops.engine.CrossMoments``) persisted per shard, merged
in shard order, then partners, rotation baseline and labels (``ops.universality``).

A seed family is recorded and compared in the same pass (:func:`record_family`): its
models' neuron statistics and their co-moments come from one forward per model and batch.
"""

from __future__ import annotations

from functools import partial

from prefect import get_run_logger, task
from tqdm.auto import tqdm

from flows.config import JobConfig, JobConfigError, ModelConfig, UniversalityConfig
from flows.engine import Ledger, Shard, Stage, run_stage
from flows.record import note_speed, record_merge
from flows.tasks import TASK
from ops.correlation import CoMoments
from ops.engine import Consumer, CrossMoments, NeuronStats
from ops.stats import HistSpec, hist_spec, stack_partials
from ops.universality import compare_groups, compute_universality, fold, overview, pairs
from storage.atlas import Atlas
from storage.store import Store

WORK = "_universality"


def _consumers(shard: Shard) -> list[Consumer]:
    """Co-moments of every layer pair of every model pair, and of every layer with itself."""
    ms = shard.models
    dev = shard.device
    out: list[Consumer] = [
        CrossMoments((i, la), (j, lb), ms[i].d_mlp, ms[j].d_mlp, dev)
        for i, j in pairs(len(ms)) for la in range(ms[i].n_layers) for lb in range(ms[j].n_layers)
    ]  # fmt: skip
    out += [CrossMoments((m, L), (m, L), lm.d_mlp, lm.d_mlp, dev)
            for m, lm in enumerate(ms) for L in range(lm.n_layers)]  # fmt: skip
    return out


def _block(n_models: int, c: Consumer) -> str:
    """The moments key of a consumer (``ops.universality.compute_universality`` reads them)."""
    (i, la), (j, lb) = c.sites
    if (i, la) == (j, lb):
        return f"m{i}.{la}"
    return f"p{pairs(n_models).index((i, j))}.{la}.{lb}"


def _persist(shard: Shard, consumers: list[Consumer]) -> dict:
    arrays = {f"{_block(len(shard.models), c)}.{k}": v
              for c in consumers for k, v in c.state().to_arrays().items()}  # fmt: skip
    shard.atlas.write_partial(WORK, shard.index, arrays)
    return {}


def _merge(models: list[ModelConfig], cfg: UniversalityConfig, atlas: Store) -> dict:
    moments: dict[str, CoMoments] = {}
    for s in tqdm(range(len(atlas.shard_ranges())), desc="merge correlations", unit="shard"):
        fold(moments, atlas.read_partial(WORK, s))
    names = [m.name for m in models]
    attrs = [atlas.model_attrs(n) for n in names]
    n_layers = [a["n_layers"] for a in attrs]
    pair_out, summary = compute_universality(names, n_layers, [a["d_mlp"] for a in attrs],
                                             moments, cfg.threshold, cfg.seed, cfg.keep_full)  # fmt: skip
    tokens = next(iter(moments.values())).n
    meta = {"baseline": cfg.baseline, "rotation_seed": cfg.seed, "threshold": cfg.threshold,
            "tokens": tokens}  # fmt: skip
    for (a, b), out in pair_out.items():
        atlas.write_pair(names[a], names[b], out["arrays"], out["matching"], meta)
    frac: dict[str, dict[int, float]] = {}
    for (m, L), arrays in summary.items():
        atlas.write_summary(names[m], L, arrays, meta)
        frac.setdefault(names[m], {})[L] = float(arrays["universal"].mean())
    features = {(m, L): {k: v for k, v in atlas.stats(names[m], L).items()
                         if k in ("frac_active", "kurt", "skew")} | atlas.props(names[m], L)
                for (m, L) in summary}  # fmt: skip
    result = {**overview(summary), "per_layer": frac, "tokens": tokens,
              "comparison": compare_groups(summary, features)}  # fmt: skip
    atlas.touch(universality=result)
    return result


def _family_consumers(k: int, spec: HistSpec, shard: Shard) -> list[Consumer]:
    """Every layer's statistics of every model, and all their co-moments."""
    stats: list[Consumer] = [NeuronStats((m, L), lm.d_mlp, k, spec, shard.device)
                             for m, lm in enumerate(shard.models) for L in range(lm.n_layers)]  # fmt: skip
    return stats + _consumers(shard)


def _family_persist(names: list[str], shard: Shard, consumers: list[Consumer]) -> dict:
    for m, name in enumerate(names):
        parts = [c.state() for c in consumers if isinstance(c, NeuronStats) and c.sites[0][0] == m]
        shard.atlas.write_partial(name, shard.index, stack_partials(parts))
    return _persist(shard, [c for c in consumers if isinstance(c, CrossMoments)])


def _family_merge(job: JobConfig, models: list[ModelConfig], preps: list[dict],
                  cfg: UniversalityConfig, atlas: Store) -> dict:  # fmt: skip
    rows = {m.name: record_merge(job, m, prep, atlas) for m, prep in zip(models, preps, strict=True)}
    return {"models": rows, **_merge(models, cfg, atlas)}


@task(name="record-family", **TASK)
def record_family(job: JobConfig, cfg: UniversalityConfig, preps: list[dict],
                  ledger: Ledger | None = None) -> dict:  # fmt: skip
    """Record every model of a family (``job``) and correlate their neurons, one pass."""
    models = list(job.models)
    if any(p["layers"] != list(range(p["n_layers"])) for p in preps):
        raise JobConfigError("a family is recorded and compared over all of its layers")
    r = job.record
    key = job.fingerprint("family", cfg.model_dump_json(), *(p["fingerprint"] for p in preps))
    stage = Stage(name="record+universality", key=key, models=models,
                  build=partial(_family_consumers, r.topk, hist_spec(r.hist_bins, r.hist_min,
                                                                     r.hist_max)),
                  persist=partial(_family_persist, [m.name for m in models]),
                  batch_size=r.batch_size, merge=partial(_family_merge, job, models, preps, cfg),
                  work=[WORK, *(m.name for m in models)], description="record + correlations")  # fmt: skip
    out = run_stage(stage, job.atlas, job.resources, ledger)
    note_speed(job.atlas, models, out)
    return _result(job, out) | {"models": out.get("models", {}),
                                "accounting": out.get("accounting")}


@task(name="universality", **TASK)
def universality(job: JobConfig, models: list[ModelConfig], cfg: UniversalityConfig,
                 ledger: Ledger | None = None) -> dict:  # fmt: skip
    """Correlate every neuron of ``models`` with every neuron of the others (one stage)."""
    atlas = Atlas.open(job.atlas)
    key = job.fingerprint("universality", cfg.model_dump_json(),
                          *(atlas.model_attrs(m.name)["fingerprint"] for m in models))  # fmt: skip
    stage = Stage(name="universality", key=key, models=models, build=_consumers,
                  persist=_persist, batch_size=job.record.batch_size,
                  merge=partial(_merge, models, cfg), work=[WORK], description="correlations")  # fmt: skip
    return _result(job, run_stage(stage, job.atlas, job.resources, ledger))


def _result(job: JobConfig, out: dict) -> dict:
    """A universality stage's summary: fresh from its merge, or as stored when skipped."""
    if out.get("skipped"):
        return {"merged": False, **Atlas.open(job.atlas).attrs.get("universality", {})}
    get_run_logger().info("universal neurons: %.2f%% (mean max corr %.3f, rotation baseline %.3f)",
                          100 * out["universal_frac"], out["mean_max_corr"], out["baseline"])  # fmt: skip
    return {"merged": True, **{k: v for k, v in out.items() if k not in ("accounting", "models")}}
