"""Universal neurons (Gurnee et al. 2024) from merged cross-model co-moments.

Given the co-moments of every layer pair of every model pair (``ops.correlation``, fed by
``ops.engine.CrossMoments``): each neuron's best partner in every other model, the best
correlation after a random orthogonal rotation of the other model's neurons (the
baseline), the excess of one over the other, and the universal label; plus the seed
paper's table comparing universal with other live neurons.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping

import numpy as np

from ops.correlation import (
    BestPartners,
    CoMoments,
    constant,
    match,
    random_rotation,
    rotated_pearson,
)


def pairs(n: int) -> list[tuple[int, int]]:
    """Every unordered model pair ``(i, j)``, ``i < j``, in a fixed order."""
    return list(itertools.combinations(range(n), 2))


def fold(parts: dict[str, CoMoments], arrays: dict[str, np.ndarray]) -> None:
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
    threshold: float = 0.5, seed: int = 0, keep_full: bool = False,
) -> tuple[dict, dict]:  # fmt: skip
    """Per directed pair: best partners, baseline, matching; per model: the family summary.

    ``moments`` holds ``"p<pair>.<la>.<lb>"`` (co-moments of layer ``la`` of the pair's first
    model with layer ``lb`` of its second, pairs in :func:`pairs` order) and ``"m<m>.<L>"``
    (each layer with itself, for the rotation baseline). A neuron is universal when its mean
    best-partner correlation over the other models exceeds the rotated baseline's by more
    than ``threshold`` (Gurnee et al. 2024) and it is not dead.
    """
    rot = {(m, L): random_rotation(d[m], rotation_seed(seed, names[m], L))
           for m in range(len(names)) for L in range(n_layers[m])}  # fmt: skip
    own = {(m, L): moments[f"m{m}.{L}"] for m in range(len(names)) for L in range(n_layers[m])}
    dead = {(m, L): constant(c.m2_a, c.mean_a, c.n) for (m, L), c in own.items()}
    pair_out: dict[tuple[int, int], dict] = {}
    for p, (i, j) in enumerate(pairs(len(names))):
        for a, b, flip in ((i, j, False), (j, i, True)):
            best = [BestPartners.empty(d[a]) for _ in range(n_layers[a])]
            base = [BestPartners.empty(d[a]) for _ in range(n_layers[a])]
            perm = np.full((n_layers[a], d[a]), -1, np.int64)
            mcorr = np.full((n_layers[a], d[a]), np.nan)
            full = (
                np.zeros((n_layers[a] * d[a], n_layers[b] * d[b]), np.float32)
                if keep_full
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
                "universal": (excess > threshold) & ~dead[(m, L)], "dead": dead[(m, L)],
            }  # fmt: skip
    return pair_out, summary


COMPARED = ("frac_active", "kurt", "skew", "vocab_kurt", "vocab_skew", "w_out_norm",
            "cos_in_out")  # fmt: skip
"""Neuron properties compared between universal and other neurons (stats and props)."""


def compare_groups(summary: Mapping[tuple[int, int], Mapping[str, np.ndarray]],
                   features: Mapping[tuple[int, int], Mapping[str, np.ndarray]]
                   ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Mean neuron properties of universal vs other live neurons (the seed paper's table).

    ``features[(model, layer)]`` holds per-neuron vectors by name (those of :data:`COMPARED`
    that are present are compared).
    """
    groups: dict[str, dict[str, list[np.ndarray]]] = {"universal": {}, "non_universal": {}}
    for site, s in summary.items():
        masks = {"universal": s["universal"], "non_universal": ~s["universal"] & ~s["dead"]}
        for feat in COMPARED:
            if feat not in features[site]:
                continue
            v = np.asarray(features[site][feat], dtype=np.float64)
            for g, mask in masks.items():
                groups[g].setdefault(feat, []).append(v[mask])
    out: dict[str, dict[str, float]] = {}
    for g, feats in groups.items():
        n = int(sum(len(x) for x in next(iter(feats.values()), [])))
        out[g] = {"count": n} | {
            f: float(np.mean(np.concatenate(v))) if n else float("nan") for f, v in feats.items()
        }
    return out


def overview(summary: Mapping[tuple[int, int], Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Family-wide means: universal fraction, best-partner r, baseline, excess."""
    def mean(key: str) -> float:
        return float(np.mean([s[key].mean() for s in summary.values()]))

    return {"universal_frac": mean("universal"), "mean_max_corr": mean("mean_max_corr"),
            "baseline": mean("baseline"), "mean_excess_corr": mean("excess_corr")}  # fmt: skip
