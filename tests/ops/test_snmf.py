"""SNMF against planted factors, independent float64 numpy / scipy computations, and itself
under regrouping of the tokens into shards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, nnls

from ops.snmf import (
    LocalShards,
    SNMFConfig,
    fit,
    init_sample_columns,
    init_y,
    init_z,
    rescale_y,
    run,
    shard_loss,
    shard_reductions,
    update_y,
    update_z,
)


def _planted(seed: int = 0, d: int = 200, k: int = 8, t: int = 3000, noise: float = 0.01):
    """``A = Z* Y* + noise``: Z* columns with 2-4 mixed-sign nonzeros, Y* >= 0, 70% zeros."""
    rng = np.random.default_rng(seed)
    z = np.zeros((d, k))
    for j in range(k):
        nnz = int(rng.integers(2, 5))
        rows = rng.choice(d, nnz, replace=False)
        z[rows, j] = rng.choice([-1.0, 1.0], nnz) * rng.uniform(0.5, 1.5, nnz)
    y = rng.exponential(1.0, (k, t)) * (rng.random((k, t)) < 0.3)
    a = z @ y + noise * rng.standard_normal((d, t))
    return a.astype(np.float32), z, y


def _loss64(a: np.ndarray, z: torch.Tensor, y: torch.Tensor) -> float:
    r = a.astype(np.float64) - z.double().numpy() @ y.double().numpy()
    return float((r * r).sum())


def test_recovers_planted_sparse_features() -> None:
    a, z_true, _ = _planted()
    cfg = SNMFConfig(k=8, keep_fraction=0.02)  # keeps ceil(0.02 * 200) = 4 neurons
    res = fit(a, cfg)
    z = res.z.double().numpy()
    cos = np.abs((z / np.linalg.norm(z, axis=0)).T @ (z_true / np.linalg.norm(z_true, axis=0)))
    rows, cols = linear_sum_assignment(cos, maximize=True)
    assert (cos[rows, cols] >= 0.9).sum() >= 6, cos[rows, cols]
    assert res.rel_error < 0.06  # noise alone is ~0.035
    assert (res.y >= 0).all()
    assert not ((res.y > 0) & (res.y < torch.finfo(torch.float32).tiny)).any()  # no subnormals
    assert ((res.z != 0).sum(0) == 4).all()
    assert torch.allclose(torch.linalg.vector_norm(res.z, dim=0), torch.ones(8), atol=1e-5)


def test_best_loss_tracking_and_patience() -> None:
    a, _, _ = _planted(seed=1, d=60, k=5, t=400, noise=0.3)
    cfg = SNMFConfig(k=5, keep_fraction=0.1, iters=300, patience=5, tol=1e-3, init="random")
    res = fit(a, cfg)
    h = res.loss_history
    assert len(h) < cfg.iters  # stopped by patience
    assert res.best_iter == int(np.argmin(h))
    best_before = min(h[: len(h) - cfg.patience])
    assert all(v >= best_before * (1 - cfg.tol) for v in h[-cfg.patience :])
    # the returned factors are the best iteration's, and rel_error is theirs
    loss = _loss64(a, res.z, res.y)
    assert loss == pytest.approx(h[res.best_iter], rel=1e-5)
    assert res.rel_error == pytest.approx(math.sqrt(loss / (a.astype(np.float64) ** 2).sum()),
                                          rel=1e-5)  # fmt: skip


def test_update_z_matches_numpy_least_squares() -> None:
    rng = np.random.default_rng(2)
    d, k, t = 50, 6, 400
    a = rng.standard_normal((d, t)).astype(np.float32)
    y = rng.random((k, t)).astype(np.float32)
    ay, yy, n2 = shard_reductions(torch.from_numpy(a), torch.from_numpy(y))
    a64, y64 = a.astype(np.float64), y.astype(np.float64)
    assert n2 == pytest.approx((a64**2).sum(), rel=1e-6)
    assert np.allclose(ay.numpy(), a64 @ y64.T, rtol=1e-5, atol=1e-3)
    ls = np.linalg.lstsq(y64.T, a64.T, rcond=None)[0].T  # argmin_Z ||A - Z Y||, [d, k]

    dense, scale = update_z(ay, yy, SNMFConfig(k=k, keep_fraction=1.0))
    assert np.allclose(scale.numpy(), np.linalg.norm(ls, axis=0), rtol=1e-4)
    assert np.allclose(dense.numpy(), ls / np.linalg.norm(ls, axis=0), atol=1e-5)

    cfg = SNMFConfig(k=k, keep_fraction=0.1)  # 5 of 50
    z, scale = update_z(ay, yy, cfg)
    z = z.double().numpy()
    for j in range(k):
        top = np.sort(np.argsort(-np.abs(ls[:, j]))[:5])
        assert np.array_equal(np.flatnonzero(z[:, j]), top)
        kept = ls[top, j]
        assert float(scale[j]) == pytest.approx(np.linalg.norm(kept), rel=1e-4)
        assert np.allclose(z[top, j], kept / np.linalg.norm(kept), atol=1e-5)
    assert np.allclose(np.linalg.norm(z, axis=0), 1.0, atol=1e-6)


@pytest.mark.parametrize(("fraction", "d", "kept"), [(0.07, 100, 7), (0.01, 50, 1), (1e-9, 10, 1),
                                                     (1.0, 13, 13), (0.02, 200, 4)])  # fmt: skip
def test_keep_count(fraction: float, d: int, kept: int) -> None:
    assert SNMFConfig(k=1, keep_fraction=fraction).keep(d) == kept


def test_update_y_nonnegative_monotone_and_converges_to_nnls() -> None:
    rng = np.random.default_rng(3)
    d, k, t = 30, 5, 200
    a = torch.from_numpy(rng.standard_normal((d, t)).astype(np.float32))
    z = torch.from_numpy(rng.standard_normal((d, k)).astype(np.float32))
    y = torch.from_numpy(rng.random((k, t)).astype(np.float32) + 0.1)
    cfg = SNMFConfig(k=k)

    # one step equals Ding, Li & Jordan's rule evaluated independently in float64
    a64, z64, y64 = (x.double().numpy() for x in (a, z, y))
    p, q = z64.T @ a64, z64.T @ z64
    pos, neg = (lambda m: np.maximum(m, 0)), (lambda m: np.maximum(-m, 0))
    want = y64 * np.sqrt((pos(p) + neg(q) @ y64) / (neg(p) + pos(q) @ y64))
    assert np.allclose(update_y(a, y, z, cfg).double().numpy(), want, rtol=1e-4, atol=1e-6)

    losses = [shard_loss(a, z, y)]
    for _ in range(400):
        y = update_y(a, y, z, cfg)
        assert (y >= 0).all()
        losses.append(shard_loss(a, z, y))
    assert all(b <= a_ * (1 + 1e-6) for a_, b in zip(losses, losses[1:], strict=False))
    # Y-step alone solves the (convex) nonnegative least squares of each column
    best = sum(nnls(z64, a64[:, i])[1] ** 2 for i in range(t))
    assert losses[-1] == pytest.approx(best, rel=1e-3)


def test_rescale_y_keeps_product() -> None:
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.standard_normal((20, 100)).astype(np.float32))
    y = torch.from_numpy(rng.random((4, 100)).astype(np.float32))
    ay, yy, _ = shard_reductions(a, y)
    z, scale = update_z(ay, yy, SNMFConfig(k=4, keep_fraction=0.2))
    raw = z * scale[None, :]  # the sparsified least-squares Z before its columns were normalised
    assert torch.allclose(z @ rescale_y(y, scale), raw @ y, atol=1e-5)


def test_grouping_into_shards_does_not_change_the_result() -> None:
    a, _, _ = _planted(seed=5, t=1500)
    cfg = SNMFConfig(k=8, keep_fraction=0.02, iters=60)
    one, three = fit(a, cfg), fit(a, cfg, shards=3)
    assert one.best_iter == three.best_iter
    assert len(one.loss_history) == len(three.loss_history)
    assert np.allclose(one.loss_history, three.loss_history, rtol=1e-5)
    assert torch.allclose(one.z, three.z, atol=1e-5)
    assert (one.y - three.y).norm() <= 1e-5 * one.y.norm()


class _Workers:
    """Shards spread over ``LocalShards`` "workers", joined as flows.snmf.RayShards does."""

    def __init__(self, groups: list[list[torch.Tensor]], cfg: SNMFConfig):
        self.workers = [LocalShards(g, cfg) for g in groups]

    def _all(self, method: str, *args) -> list:
        return [x for w in self.workers for x in getattr(w, method)(*args)]

    def n_tokens(self) -> int:
        return sum(w.n_tokens() for w in self.workers)

    def columns(self, idx: np.ndarray) -> torch.Tensor:
        out, start = [], 0
        for w in self.workers:
            n = w.n_tokens()
            out.append(w.columns(idx[(idx >= start) & (idx < start + n)] - start))
            start += n
        return torch.cat(out, dim=1)

    def init(self, z: torch.Tensor) -> None:
        for w in self.workers:
            w.init(z)

    def norms(self) -> list[float]:
        return self._all("norms")

    def reductions(self) -> list:
        return self._all("reductions")

    def step(self, z: torch.Tensor, scale: torch.Tensor) -> list[float]:
        return self._all("step", z, scale)

    def keep_best(self) -> None:
        for w in self.workers:
            w.keep_best()

    def best_y(self) -> torch.Tensor:
        return torch.cat(self._all("best_y"), dim=1)


def test_run_over_workers_equals_fit() -> None:
    a, _, _ = _planted(seed=8, d=80, k=6, t=900)
    cfg = SNMFConfig(k=6, keep_fraction=0.05, iters=40, init_tokens=300)
    ref = fit(a, cfg, shards=5)
    parts = list(torch.tensor_split(torch.from_numpy(a), 5, dim=1))  # as fit splits
    got = run(_Workers([parts[:2], parts[2:3], parts[3:]], cfg), cfg)
    assert got.loss_history == ref.loss_history and got.best_iter == ref.best_iter
    assert torch.equal(got.z, ref.z) and torch.equal(got.y, ref.y)


@pytest.mark.parametrize("init", ["svd", "kmeans", "random"])
def test_inits_are_deterministic_and_columnwise(init: str) -> None:
    a, _, _ = _planted(seed=6, d=40, k=4, t=600)
    cfg = SNMFConfig(k=4, keep_fraction=0.1, iters=15, init=init, seed=3, init_tokens=256)
    first, again = fit(a, cfg), fit(a, cfg)
    assert torch.equal(first.z, again.z) and torch.equal(first.y, again.y)
    assert first.loss_history == again.loss_history
    assert first.loss_history[-1] < first.loss_history[0] or first.best_iter == 0

    cols = init_sample_columns(a.shape[1], cfg)
    assert len(cols) == 256 and np.array_equal(cols, np.unique(cols))
    z0 = init_z(a[:, cols], cfg)
    assert z0.shape == (40, 4) and torch.equal(z0, init_z(a[:, cols], cfg))
    y0 = init_y(a, z0, cfg)
    assert y0.shape == (4, 600) and (y0 > 0).all()
    parts = torch.tensor_split(torch.from_numpy(a), [100, 350], dim=1)
    assert torch.allclose(torch.cat([init_y(p, z0, cfg) for p in parts], 1), y0, atol=1e-5)
    if init != "svd":  # svd of the same sample does not depend on the seed
        other = init_z(a[:, cols], SNMFConfig(**{**cfg.__dict__, "seed": 4}))
        assert not torch.equal(z0, other)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"k": 0}, "k"), ({"k": -3}, "k"), ({"keep_fraction": 0.0}, "keep_fraction"),
     ({"keep_fraction": 1.5}, "keep_fraction"), ({"keep_fraction": -0.1}, "keep_fraction"),
     ({"init": "pca"}, "init"), ({"patience": 0}, "patience"), ({"iters": 0}, "iters"),
     ({"eps": 0.0}, "eps")],
)  # fmt: skip
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"SNMFConfig\.{field} "):
        SNMFConfig(**{"k": 4, **kwargs})


def test_too_many_features_for_the_sample() -> None:
    with pytest.raises(ValueError, match="k=5"):
        init_z(np.ones((4, 100), np.float32), SNMFConfig(k=5))


def test_transform_matches_scipy_nnls():
    """Coefficients of unseen tokens under a fixed Z: per-token NNLS, solved independently."""
    from ops.snmf import transform

    rng = np.random.default_rng(0)
    d, k, t = 48, 6, 300
    z = rng.normal(size=(d, k)) * (rng.random((d, k)) < 0.4)
    y = rng.exponential(size=(k, t)) * (rng.random((k, t)) < 0.3)
    a = (z @ y + 0.1 * rng.normal(size=(d, t))).astype(np.float32)
    got = transform(a, z.astype(np.float32)).double().numpy()
    want = np.stack([nnls(z, a[:, j].astype(np.float64))[0] for j in range(t)], 1)
    assert (got >= 0).all()
    np.testing.assert_allclose(got, want, atol=1e-4)
    loss_got = ((a - z @ got) ** 2).sum()
    loss_want = ((a - z @ want) ** 2).sum()
    assert loss_got <= loss_want * (1 + 1e-5)
