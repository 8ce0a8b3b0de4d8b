"""Universal neurons (Gurnee et al. 2024) at the reference study's scale.

The co-moments of every model pair are accumulated in tiles (``ops.correlation.FamilyMoments``,
one GEMM per tile and batch) by workers that hold them across all the shards they are given;
:func:`plan` decides the tiles and what each worker holds before any work starts. Each pair
tile is then finalised where it lives, a layer of rows at a time (:func:`finalize_tile`): every
neuron's best partner (layer, index, r) and worst r in the other model, the best r after a
random orthogonal rotation of the other model's neurons (the baseline: ``C·Q`` from the
moments, with ``diag(QᵀCQ)`` computed once per (model, layer) by :func:`rotation_stats`), and
the Hungarian matching of equal layers. Only O(neurons) results leave the worker
(:func:`assemble` joins them); the full r matrix is streamed out only when asked for.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ops.correlation import CoMoments, FamilyMoments, constant, match
from ops.plan import OwnTile, PairTile, pairs


def rotation_seed(seed: int, model: str, layer: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{model}/{layer}".encode())) % 2**32


def rotation(d: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal ``[d, d]`` (float64, CPU): QR of a seeded Gaussian with the sign
    fix. Always computed on the CPU in float64, so every worker and the driver get the same
    matrix whatever their device."""
    g = torch.from_numpy(np.random.default_rng(seed).standard_normal((d, d)))
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


# ------------------------------------------------------------------ per (model, layer)


@dataclass
class LayerMoments:
    """What finalisation needs of one compared layer of one model: ``n``, mean and ``M2`` of
    its neurons, dead mask, and ``M2`` of its rotated neurons (the baseline's denominator)."""

    n: int
    mean: np.ndarray
    m2: np.ndarray
    dead: np.ndarray
    m2_rot: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.asarray([self.n]), "mean": self.mean, "m2": self.m2,
                "dead": self.dead, "m2_rot": self.m2_rot}  # fmt: skip

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> LayerMoments:
        return cls(int(np.asarray(a["n"]).reshape(-1)[0]), np.asarray(a["mean"]),
                   np.asarray(a["m2"]), np.asarray(a["dead"]).astype(bool), np.asarray(a["m2_rot"]))  # fmt: skip


def own_moments(acc: FamilyMoments, tile: OwnTile) -> list[CoMoments]:
    """The centred within-layer co-moments of an own tile, one :class:`CoMoments` per layer
    (mergeable across workers)."""
    mean, m2, n = acc.columns(tile.model)
    cols = acc._cols(tile.model, tile.lo, tile.hi)
    mean, m2 = mean[cols], m2[cols]
    cov = acc.centred(tile).cpu().numpy()
    d = acc.d[tile.model]
    return [CoMoments(n, mean[k * d : (k + 1) * d], mean[k * d : (k + 1) * d],
                      m2[k * d : (k + 1) * d], m2[k * d : (k + 1) * d], cov[k])
            for k in range(tile.hi - tile.lo)]  # fmt: skip


def rotation_stats(cm: CoMoments, q: torch.Tensor) -> LayerMoments:
    """One layer's :class:`LayerMoments` from its merged within-layer co-moments: the one
    ``d³`` product per (model, layer), ``diag(Qᵀ C Q)``."""
    c = torch.from_numpy(cm.c)
    m2_rot = np.maximum(((c @ q) * q).sum(0).numpy(), 0.0)
    return LayerMoments(cm.n, cm.mean_a, cm.m2_a, constant(cm.m2_a, cm.mean_a, cm.n), m2_rot)


# ------------------------------------------------------------------ finalising a pair tile


PAIR_KEYS = ("partner_layer", "partner_index", "max_corr", "min_corr", "baseline_max_corr")


def _empty(n_layers: int, d: int) -> dict[str, np.ndarray]:
    return {"partner_layer": np.full((n_layers, d), -1, np.int32),
            "partner_index": np.full((n_layers, d), -1, np.int32),
            "max_corr": np.full((n_layers, d), -np.inf), "min_corr": np.full((n_layers, d), np.inf),
            "baseline_max_corr": np.full((n_layers, d), -np.inf)}  # fmt: skip


def _r(c: torch.Tensor, m2_a: torch.Tensor, m2_b: torch.Tensor, ok_a: torch.Tensor,
       ok_b: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Pearson r from a centred co-moment block, **in place** (a block of rows can be a
    large part of a worker's memory); dead or zero-variance neurons give 0."""
    ia = torch.where(ok_a & (m2_a > 0), m2_a.clamp(min=1e-300).rsqrt(), 0.0)
    ib = torch.where(ok_b & (m2_b > 0), m2_b.clamp(min=1e-300).rsqrt(), 0.0)
    return c.mul_(ia[:, None]).mul_(ib[None, :]).clamp_(-1, 1)


@dataclass
class TileResult:
    """O(neurons) results of one pair tile: ``fwd`` for the tile's rows of ``a`` (complete:
    every column of ``b`` was seen), ``rev`` for every neuron of ``b`` over this tile's rows
    only (:func:`assemble` reduces the tiles), matchings of equal layers."""

    tile: PairTile
    fwd: dict[str, np.ndarray]  # [hi - lo, d_a]
    rev: dict[str, np.ndarray]  # [layers_b, d_b]
    matching: dict[int, tuple[np.ndarray, np.ndarray]]  # a's layer position -> (perm, corr)


ROW_BLOCK_BYTES = 256 << 20
"""Finalising takes r this many bytes (float64) of rows at a time."""


def finalize_tile(acc: FamilyMoments, tile: PairTile, layers: list[list[int]],
                  own: Mapping[tuple[int, int], LayerMoments],
                  rot: Callable[[int, int], torch.Tensor],
                  full: bool = False) -> Iterator[tuple[int, int, np.ndarray] | TileResult]:  # fmt: skip
    """Finalise one pair tile on the accumulator's device.

    ``own[(model, position)]`` are the layer moments of both models' compared layers,
    ``rot(model, position)`` their rotations (made on demand: each is d² floats). The
    baselines run a (layer of a, layer of b) block at a time, each rotation of b made once;
    then r, a block of rows at a time (:data:`ROW_BLOCK_BYTES`: the only large allocation
    besides the state). Yields ``(a's layer position, first row, r block [rows, D_b]
    float32)`` for each block when ``full``, then the :class:`TileResult`.
    """
    a, b = tile.a, tile.b
    da, db = acc.d[a], acc.d[b]
    nb = len(layers[b])
    dev = acc.device
    f64 = dict(dtype=torch.float64, device=dev)
    yes_a = torch.ones(da, dtype=torch.bool, device=dev)
    yes_b = torch.ones(db, dtype=torch.bool, device=dev)
    m2_b = torch.cat([torch.as_tensor(own[(b, p)].m2, **f64) for p in range(nb)])
    ok_b = ~torch.cat([torch.as_tensor(own[(b, p)].dead, device=dev) for p in range(nb)])
    fwd = _empty(tile.hi - tile.lo, da)
    rev = _empty(nb, db)
    matching: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    # baselines: a's neurons against b's rotated layers, and b's against a's rotated layers;
    # the d³ products in float32 (r to ~1e-6)
    qa = {pa: rot(a, pa).to(dev, torch.float32) for pa in range(tile.lo, tile.hi)}
    base = torch.full((tile.hi - tile.lo, da), -math.inf, **f64)
    for pb in range(nb):
        lb = own[(b, pb)]
        qb = rot(b, pb).to(dev, torch.float32)
        m2r_b, m2b = torch.as_tensor(lb.m2_rot, **f64), torch.as_tensor(lb.m2, **f64)
        okb = ~torch.as_tensor(lb.dead, device=dev)
        for k, pa in enumerate(range(tile.lo, tile.hi)):
            la = own[(a, pa)]
            cb = acc.centred(tile, slice(k * da, (k + 1) * da), slice(pb * db, (pb + 1) * db)).float()
            rr = _r((cb @ qb).double(), torch.as_tensor(la.m2, **f64), m2r_b,
                    ~torch.as_tensor(la.dead, device=dev), yes_b)  # fmt: skip
            base[k] = torch.maximum(base[k], rr.max(1).values)
            rq = _r((qa[pa].T @ cb).double(), torch.as_tensor(la.m2_rot, **f64), m2b, yes_a, okb)
            rev["baseline_max_corr"][pb] = np.maximum(rev["baseline_max_corr"][pb],
                                                      rq.max(0).values.cpu().numpy())  # fmt: skip
        del qb
    fwd["baseline_max_corr"][:] = base.cpu().numpy()
    del qa
    step = max(1, min(da, ROW_BLOCK_BYTES // (8 * nb * db)))
    for k, pa in enumerate(range(tile.lo, tile.hi)):
        la = own[(a, pa)]
        m2_a = torch.as_tensor(la.m2, **f64)
        ok_a = ~torch.as_tensor(la.dead, device=dev)
        same = [pb for pb in range(nb) if layers[a][pa] == layers[b][pb]]
        square = np.empty((da, db)) if same else None  # r of the equal layer, for matching
        for r0 in range(0, da, step):
            r1 = min(da, r0 + step)
            c = acc.centred(tile, slice(k * da + r0, k * da + r1))  # [rows, D_b] float64
            r = _r(c, m2_a[r0:r1], m2_b, ok_a[r0:r1], ok_b)  # in place: the one big copy
            if full:
                yield pa, r0, r.float().cpu().numpy()
            # a -> b: best partner over every column (first index wins ties: earlier layer)
            j = r.argmax(1)
            fwd["max_corr"][k, r0:r1] = r.max(1).values.cpu().numpy()
            fwd["partner_layer"][k, r0:r1] = (j // db).cpu().numpy()
            fwd["partner_index"][k, r0:r1] = (j % db).cpu().numpy()
            fwd["min_corr"][k, r0:r1] = r.min(1).values.cpu().numpy()
            # b -> a: these rows folded into the running best (strict: earlier rows win ties)
            rb, ri = r.max(0).values, r.argmax(0) + r0
            rb, ri = rb.reshape(nb, db).cpu().numpy(), ri.reshape(nb, db).cpu().numpy()
            better = rb > rev["max_corr"]
            rev["max_corr"] = np.where(better, rb, rev["max_corr"])
            rev["partner_layer"] = np.where(better, pa, rev["partner_layer"]).astype(np.int32)
            rev["partner_index"] = np.where(better, ri, rev["partner_index"]).astype(np.int32)
            rev["min_corr"] = np.minimum(rev["min_corr"],
                                         r.min(0).values.reshape(nb, db).cpu().numpy())  # fmt: skip
            if square is not None:
                square[r0:r1] = r[:, same[0] * db : (same[0] + 1) * db].cpu().numpy()
            del c, r
        if square is not None:
            matching[pa] = match(square)
    # back to the models' layer numbers
    fwd["partner_layer"] = np.asarray(layers[b], np.int32)[fwd["partner_layer"]]
    seen = rev["partner_layer"] >= 0
    rev["partner_layer"] = np.where(seen, np.asarray(layers[a] + [-1], np.int32)[rev["partner_layer"]], -1).astype(np.int32)
    yield TileResult(tile, fwd, rev, matching)


def assemble(n_models: int, layers: list[list[int]], d: list[int], n_layers: list[int],
             results: list[TileResult]) -> dict[tuple[int, int], dict]:  # fmt: skip
    """Every directed pair's arrays ``[n_layers_a, d_a]`` (rows of layers not compared stay
    empty: -1 / NaN) and matchings, from the tile results (reduced in tile order: the result
    does not depend on which worker finalised which tile)."""
    out: dict[tuple[int, int], dict] = {}
    for i, j in pairs(n_models):
        for a, b in ((i, j), (j, i)):
            arrays = _empty(n_layers[a], d[a])
            for k in ("max_corr", "min_corr", "baseline_max_corr"):
                arrays[k][:] = np.nan
            out[(a, b)] = {"arrays": arrays,
                           "matching": {"perm": np.full((n_layers[a], d[a]), -1, np.int64),
                                        "corr": np.full((n_layers[a], d[a]), np.nan)}}  # fmt: skip
    rev_acc: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for res in sorted(results, key=lambda r: (r.tile.a, r.tile.b, r.tile.lo)):
        t = res.tile
        fw = out[(t.a, t.b)]
        rows = [layers[t.a][p] for p in range(t.lo, t.hi)]
        for k in PAIR_KEYS:
            fw["arrays"][k][rows] = res.fwd[k]
        for pa, (perm, corr) in res.matching.items():
            L = layers[t.a][pa]
            fw["matching"]["perm"][L], fw["matching"]["corr"][L] = perm, corr
            inv = np.full(d[t.b], -1, np.int64)
            inv[perm[perm >= 0]] = np.flatnonzero(perm >= 0)
            bw = out[(t.b, t.a)]["matching"]
            bw["perm"][L] = inv
            bw["corr"][L] = np.where(inv >= 0, corr[np.maximum(inv, 0)], np.nan)
        acc = rev_acc.get((t.b, t.a))
        if acc is None:
            rev_acc[(t.b, t.a)] = {k: v.copy() for k, v in res.rev.items()}
            continue
        better = res.rev["max_corr"] > acc["max_corr"]
        for k in ("partner_layer", "partner_index", "max_corr"):
            acc[k] = np.where(better, res.rev[k], acc[k])
        acc["min_corr"] = np.minimum(acc["min_corr"], res.rev["min_corr"])
        acc["baseline_max_corr"] = np.maximum(acc["baseline_max_corr"], res.rev["baseline_max_corr"])
    for (b, a), acc in rev_acc.items():
        rows = layers[b]
        for k in PAIR_KEYS:
            out[(b, a)]["arrays"][k][rows] = acc[k]
    return out


def summarise(names: list[str], layers: list[list[int]],
              pair_out: Mapping[tuple[int, int], dict],
              own: Mapping[tuple[int, int], LayerMoments],
              threshold: float) -> dict[tuple[int, int], dict[str, np.ndarray]]:  # fmt: skip
    """Per model and compared layer: mean/max/min best-partner r over the other models, the
    baseline, the excess and the universal label (excess above ``threshold``, not dead)."""
    summary: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for m in range(len(names)):
        others = [o for o in range(len(names)) if o != m]
        for p, L in enumerate(layers[m]):
            mx = np.stack([pair_out[(m, o)]["arrays"]["max_corr"][L] for o in others])
            bl = np.stack([pair_out[(m, o)]["arrays"]["baseline_max_corr"][L] for o in others])
            mean, baseline = mx.mean(0), bl.mean(0)
            excess = mean - baseline
            dead = own[(m, p)].dead
            summary[(m, L)] = {
                "mean_max_corr": mean, "max_max_corr": mx.max(0), "min_max_corr": mx.min(0),
                "baseline": baseline, "excess_corr": excess,
                "universal": (excess > threshold) & ~dead, "dead": dead,
            }  # fmt: skip
    return summary


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
