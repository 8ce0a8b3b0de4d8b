"""The neuron taxonomy in the record stage: the firing thresholds (a probe of shard 0 when
the rule is a per-neuron quantile), the counters every shard feeds from the record pass's
forward, and the scores and labels written once the counts are merged (``ops.taxonomy``).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from flows.config import JobConfig, ModelConfig, TaxonomyConfig
from flows.engine import Ledger, Shard, Stage, stream_stage
from ops.configs import TAXONOMY_KINDS, TAXONOMY_SCORES
from ops.engine import Consumer, FiringProbe, NeuronCounters, ShardTokens
from ops.taxonomy import (
    BIGRAM_BASE,
    CountersPartial,
    Thresholds,
    firing_rule,
    labels,
    pad_sources,
    position_buckets,
    scores,
    stack_counters,
)
from storage.layout import TAXONOMY
from storage.store import Store

PREFIX = "tax_"
"""Prefix of the counters' arrays in a shard's record partial."""


# ------------------------------------------------------------------ firing thresholds


def _probe_consumers(layers: list[int], q: float, tokens: int, shard: Shard) -> list[Consumer]:
    return [FiringProbe((0, L), q, tokens) for L in layers]


def _probe_persist(shard: Shard, consumers: list[Consumer]) -> dict:
    probes = [c for c in consumers if isinstance(c, FiringProbe)]
    return {"thresholds": np.stack([c.state() for c in probes]).astype(np.float32),
            "probe_tokens": probes[0].n}  # fmt: skip


def firing(job: JobConfig, model: ModelConfig, prep: dict, ledger: Ledger | None = None
           ) -> tuple[dict, np.ndarray] | None:  # fmt: skip
    """The firing rule of the model's neurons and its thresholds ``[layers, d]`` (None when
    the job counts nothing). A quantile rule probes shard 0 once; the thresholds are kept in
    each layer's ``taxonomy`` group, so a resumed or grown run uses the same ones."""
    tax = job.record.taxonomy
    if tax is None:
        return None
    rule = firing_rule(tax.threshold, tax.quantile, prep.get("activation", "unknown"))
    layers, d = prep["layers"], prep["d_mlp"]
    if rule["rule"] == "threshold":
        return rule, np.full((len(layers), d), rule["value"], np.float32)
    atlas = Store.open(job.atlas)
    groups = [atlas.layer_group(model.name, L) for L in layers]
    kept = [g[TAXONOMY] for g in groups if TAXONOMY in g]
    if len(kept) == len(layers) and all(
        k.attrs.get("firing", {}).get("q") == rule["q"] and "threshold" in k for k in kept
    ):
        return dict(kept[0].attrs["firing"]), np.stack([k["threshold"][...] for k in kept])
    stage = Stage(name=f"firing/{model.name}", key=prep["fingerprint"], models=[model],
                  build=partial(_probe_consumers, layers, rule["q"], tax.probe_tokens),
                  persist=_probe_persist, batch_size=job.record.batch_size,
                  description=f"firing thresholds {model.name}")  # fmt: skip
    (out,) = list(stream_stage(stage, job.atlas, [0], job.resources, ledger))
    rule = rule | {"tokens": int(out["probe_tokens"]), "shard": 0}
    thr = out["thresholds"]
    for i, L in enumerate(layers):
        atlas.write_taxonomy(model.name, L, {"threshold": thr[i]}, {"firing": rule})
    return rule, thr


# ------------------------------------------------------------------ counters


def counter_consumers(tax: TaxonomyConfig, layers: list[int], thresholds: np.ndarray,
                      shard: Shard) -> list[Consumer]:  # fmt: skip
    """One :class:`NeuronCounters` per recorded layer of the shard's model."""
    atlas, lm = shard.atlas, shard.models[0]
    a, b = atlas.shard_ranges()[shard.index]
    tokens, _ = atlas.read_shard(shard.index)
    c = atlas.corpus
    rows = ShardTokens(tokens, a, c["sources"][a:b],
                       position_buckets(tokens.shape[1], tax.buckets), c.attrs["prepend_bos"])  # fmt: skip
    n_sources = len(c.attrs["source_names"])
    return [NeuronCounters((0, L), lm.d_mlp, rows, n_sources, tax.sketch, thresholds[i],
                           shard.device) for i, L in enumerate(layers)]  # fmt: skip


def counter_arrays(consumers: list[Consumer]) -> dict[str, np.ndarray]:
    """The shard's counters, stacked over layers, as partial arrays (:data:`PREFIX`)."""
    parts = [c.state() for c in consumers if isinstance(c, NeuronCounters)]
    return stack_counters(parts).to_arrays(PREFIX) if parts else {}


def read_counters(arrays: dict[str, np.ndarray], sources: int) -> CountersPartial | None:
    """The counters in a partial's arrays (None when it has none), sources widened."""
    if PREFIX + "tokens" not in arrays:
        return None
    return pad_sources(CountersPartial.from_arrays(arrays, PREFIX), sources)


def write_labels(atlas: Store, model: str, layers: list[int], counts: CountersPartial,
                 stats: dict[str, np.ndarray], rule: dict, tax: TaxonomyConfig,
                 thresholds: np.ndarray) -> dict[int, dict[str, float]]:  # fmt: skip
    """Scores and labels of every layer from the merged counts; returns the fraction of
    each kind per layer."""
    t = Thresholds(min_fires=tax.min_fires, token=tax.token, ngram=tax.ngram,
                   positional=tax.positional, source=tax.source)  # fmt: skip
    c = atlas.corpus.attrs
    out = {}
    for i, L in enumerate(layers):
        p = CountersPartial(**{k: v[i] for k, v in vars(counts).items()})
        sc = scores(p)
        lab = labels(sc, dead=stats["dead"][i] | (p.fires == 0), massive=stats["massive"][i],
                     t=t, fires=p.fires)  # fmt: skip
        arrays = {"threshold": thresholds[i], "fires": p.fires, "pos_tokens": p.pos_tokens,
                  "src_tokens": p.src_tokens, "tok_items": p.tok_items,
                  "tok_counts": p.tok_counts, "tok_err": p.tok_err, "bi_items": p.bi_items,
                  "bi_counts": p.bi_counts, "bi_err": p.bi_err, **sc,
                  **{f"kind_{k}": v for k, v in lab.items()}}  # fmt: skip
        attrs = {"firing": rule, "tokens": int(p.tokens), "sources": list(c["source_names"]),
                 "buckets": int(len(p.pos_tokens)), "seq_len": int(c["seq_len"]),
                 "bigram_base": BIGRAM_BASE, "labels": vars(t), "kinds": list(TAXONOMY_KINDS),
                 "scores": {k: v for k, v in TAXONOMY_SCORES.items() if v}}  # fmt: skip
        atlas.write_taxonomy(model, L, arrays, attrs)
        out[L] = {k: float(v.mean()) for k, v in lab.items()}
    return out
