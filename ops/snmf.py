"""Semi-nonnegative matrix factorisation (SNMF) of MLP activations, split for sharded runs.

The recipe of Shafran, Geiger & Geva (2025), "Decomposing MLP Activations into
Interpretable Features via Semi-Nonnegative Matrix Factorization": activations
``A [d_mlp, tokens] ≈ Z Y`` with ``Z [d_mlp, k]`` mixed-sign and sparse (each feature is a
handful of co-activated neurons) and ``Y [k, tokens] ≥ 0`` (how much of each feature each
token holds). Each iteration alternates

1. ``Z ← (A Yᵀ)(Y Yᵀ)⁻¹`` (closed-form least squares, as a solve), then keep the
   ``keep_fraction`` largest ``|z|`` of each column and rescale columns to unit norm, moving
   the scale into ``Y`` so that ``Z Y`` is unchanged;
2. the multiplicative semi-NMF update of ``Y`` (Ding, Li & Jordan 2010), which keeps
   ``Y ≥ 0`` and does not increase the loss with ``Z`` fixed;

and keeps the factors of the best loss, since hard sparsification makes the loss
non-monotone.

Why it is split into functions: the ``Z`` step needs only the sums over token shards of
``A_s Y_sᵀ`` (``[d, k]``) and ``Y_s Y_sᵀ`` (``[k, k]``), and the ``Y`` step and the loss are
local to a shard, so a driver can keep each shard (and its ``Y_s``) on one worker and move
only ``d·k`` numbers per iteration. Products are float32 on the shard's device; sums over
shards, the solve and the loss are float64, so any grouping of the tokens into shards gives
the same result up to float32 rounding of the per-shard products. Each column of ``Y`` is
initialised from its own column of ``A`` only, for the same reason.

:func:`run` is the one loop, over a :class:`ShardBackend`: :class:`LocalShards` holds shards
in this process (a Ray actor wraps one per worker, ``flows.dictionaries``), and :func:`fit`
runs it over one array split into ``shards`` blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ops.configs import SNMFConfig
from ops.errors import ConfigError

#: Columns per block when a shard is streamed (loss, norms): bounds temporaries to
#: ``d_mlp * _CHUNK`` floats whatever the shard size.
_CHUNK = 8192
#: Initial weight of every feature on every token in the k-means init (Ding et al.: G = H + 0.2).
_KMEANS_OFFSET = 0.2
_KMEANS_ITERS = 25
#: Y entries below this are set to 0 after each Y step. The multiplicative update shrinks
#: unused entries geometrically; left alone they become float32 subnormals (and their
#: squares in Y Yᵀ underflow), which made iterations 15x slower on CPU after ~50 steps.
#: 1e-18 is far below float32 resolution of any meaningful activation, and squares stay normal.
_Y_FLUSH = 1e-18

Array = np.ndarray | torch.Tensor


@dataclass
class SNMFResult:
    """Factors at the best loss, ``A ≈ z @ y``."""

    z: torch.Tensor  # [d, k] float32, sparse, unit-norm columns (all-zero if a feature died)
    y: torch.Tensor  # [k, T] float32, >= 0
    loss_history: list[float] = field(default_factory=list)  # ||A - Z Y||²_F per iteration
    best_iter: int = -1  # index into loss_history of the returned factors
    rel_error: float = float("nan")  # ||A - Z Y||_F / ||A||_F of the returned factors


# --------------------------------------------------------------------------- helpers


def _f32(x: Array, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _gram_solve(g: torch.Tensor, rhs: torch.Tensor, eps: float) -> torch.Tensor:
    """``(G + ridge I)⁻¹ rhs`` in float64, ridge = eps · mean(diag G) (scale-free) or eps."""
    g = g.to(torch.float64)
    k = g.shape[0]
    scale = float(torch.diagonal(g).mean()) if k else 0.0
    ridge = eps * scale if scale > 0 else eps
    eye = torch.eye(k, dtype=torch.float64, device=g.device)
    return torch.linalg.solve(g + ridge * eye, rhs.to(torch.float64))


def _sq_norm(a: torch.Tensor) -> float:
    """``||a||²_F``: float32 sums per column (d terms), float64 across columns and blocks.

    2.5x faster than a float64 reduction over the elements and as accurate here (~1e-9).
    """
    total = 0.0
    for s in range(0, a.shape[1], _CHUNK):
        blk = a[:, s : s + _CHUNK]
        total += float((blk * blk).sum(0).double().sum())
    return total


# --------------------------------------------------------------------------- initialisation


def init_sample_columns(n_tokens: int, cfg: SNMFConfig) -> np.ndarray:
    """Sorted global token indices whose columns feed :func:`init_z` (all when few).

    Drawn from ``cfg.seed`` and the token count only, so that a sharded driver (which maps
    them to shards) and :func:`fit` start from the same sample.
    """
    if n_tokens <= cfg.init_tokens:
        return np.arange(n_tokens, dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.choice(n_tokens, cfg.init_tokens, replace=False)).astype(np.int64)


def _kmeans(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on the rows of ``x [n, d]`` with k-means++ seeding; centroids [k, d].

    Deterministic for a generator state. An empty cluster takes the point farthest from its
    centroid, so every feature starts from data.
    """
    n = x.shape[0]
    x2 = (x * x).sum(1)
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=gen))
    centres[0] = x[first]
    d2 = (x2 - 2 * x @ centres[0] + x2[first]).clamp_min(0)
    for j in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        i = int(torch.multinomial(p.cpu(), 1, generator=gen))
        centres[j] = x[i]
        d2 = torch.minimum(d2, (x2 - 2 * x @ centres[j] + x2[i]).clamp_min(0))
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(_KMEANS_ITERS):
        dist = x2[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
        new = dist.argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        far = dist.gather(1, labels[:, None])[:, 0].clone()
        for j in torch.nonzero(counts == 0)[:, 0].tolist():
            i = int(far.argmax())
            centres[j] = x[i]
            far[i] = -1.0
    return centres


def _top_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors and values of ``x [d, n]`` from the smaller Gram matrix.

    An eigendecomposition of ``x xᵀ`` (or ``xᵀ x``) is ~10x faster than a full SVD of a
    wide sample on CPU and accurate enough for the leading directions an init needs.
    """
    d, n = x.shape
    if d <= n:
        w, v = torch.linalg.eigh(x @ x.T)
        w, u = w.flip(0)[:k], v.flip(1)[:, :k]
    else:
        w, v = torch.linalg.eigh(x.T @ x)
        w, v = w.flip(0)[:k], v.flip(1)[:, :k]
        ok = w > 0  # a rank-deficient sample: zero columns rather than 0/0
        u = torch.where(ok[None, :], x @ v / torch.where(ok, w, 1.0).sqrt()[None, :], 0.0)
    return u, w.clamp_min(0).sqrt()


@torch.no_grad()
def init_z(sample: Array, cfg: SNMFConfig) -> torch.Tensor:
    """Initial ``Z [d, k]`` (float32) from a sample of columns of ``A [d, n]``.

    Only :func:`init_y` uses it: the first iteration re-solves ``Z`` from ``Y``, as in the
    paper. "svd": ``U √Σ`` of the sample, each vector's sign chosen so that the sample's
    positive projections carry more energy (``Y = relu(...)`` keeps that side).
    "kmeans": centroids of the sample's columns. "random": standard Gaussian.
    """
    x = _f32(sample)
    if x.dim() != 2:
        raise ConfigError(f"init_z: sample must be [d, n], got {tuple(x.shape)}")
    d, n = x.shape
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "random":
        return torch.randn(d, cfg.k, generator=gen, dtype=torch.float64).to(x)
    if cfg.k > min(d, n):
        raise ConfigError(
            f"init_z: {cfg.init!r} init needs k={cfg.k} <= min(d, sample tokens) = {min(d, n)}"
        )
    if cfg.init == "kmeans":
        return _kmeans(x.T.cpu().double(), cfg.k, gen).T.to(x)
    x = x.double()
    u, s = _top_svd(x, cfg.k)
    p = u.T @ x  # [k, n]
    pos = (p.clamp_min(0) ** 2).sum(1)
    neg = (p.clamp_max(0) ** 2).sum(1)
    sign = torch.where(pos >= neg, 1.0, -1.0).to(u)
    return (u * (sign * s.sqrt())[None, :]).to(x)


@torch.no_grad()
def init_y(a_s: Array, z: torch.Tensor, cfg: SNMFConfig) -> torch.Tensor:
    """Nonnegative initial ``Y_s [k, T_s]`` for one shard, column by column.

    "svd" / "random": ``relu`` of the least-squares coefficients ``(ZᵀZ)⁻¹ZᵀA_s`` (for svd
    and the whole of A this is the paper's ``√Σ Vᵀ``), floored at ``eps`` because a
    multiplicative update never moves an exact zero. "kmeans": Ding et al.'s indicator of
    the nearest centroid plus 0.2. No randomness: a column's init depends only on that column,
    so the grouping of tokens into shards does not matter.
    """
    a_s = _f32(a_s)
    z = _f32(z, a_s.device)
    y = torch.empty(z.shape[1], a_s.shape[1], dtype=torch.float32, device=a_s.device)
    z64 = z.double()
    gram = z64.T @ z64
    for s in range(0, a_s.shape[1], _CHUNK):  # blocks: temporaries stay small next to Y_s
        p = z.T @ a_s[:, s : s + _CHUNK]
        if cfg.init == "kmeans":
            score = (z * z).sum(0)[:, None] - 2 * p  # ||a - c||² - ||a||²
            blk = torch.full_like(score, _KMEANS_OFFSET)
            blk.scatter_(0, score.argmin(0, keepdim=True), 1.0 + _KMEANS_OFFSET)
        else:
            blk = _gram_solve(gram, p, cfg.eps).clamp_min_(0).add_(cfg.eps)
        y[:, s : s + _CHUNK] = blk
    return y


# --------------------------------------------------------------------------- iteration


@torch.no_grad()
def shard_reductions(
    a_s: Array, y_s: torch.Tensor, norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A_s Y_sᵀ [d, k], Y_s Y_sᵀ [k, k], ||A_s||²_F)``: all a Z step needs from a shard.

    Products in float32 on the shard's device, returned in float64 so that the driver's sum
    over shards adds no rounding of its own. Sum them in a fixed (shard) order.
    ``||A_s||²`` does not change between iterations: ``norm=False`` skips that pass over the
    shard and returns NaN in its place.
    """
    a_s = _f32(a_s)
    y_s = _f32(y_s, a_s.device)
    n2 = _sq_norm(a_s) if norm else math.nan
    return (a_s @ y_s.T).double(), (y_s @ y_s.T).double(), n2


@torch.no_grad()
def update_z(
    ay: torch.Tensor, yy: torch.Tensor, cfg: SNMFConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Z step from the summed reductions: ``(z [d, k], scale [k])``, both float32.

    ``Z = (Σ A Yᵀ)(Σ Y Yᵀ + ridge)⁻¹`` by a float64 solve (not an inverse: better conditioned
    and cheaper), then per column keep exactly ``cfg.keep(d)`` largest ``|z|`` (ties as
    ``torch.topk`` breaks them) and divide by the column norm. ``scale`` is that norm (0 for a
    dead column): pass it to :func:`rescale_y` so ``Z Y`` is unchanged, which keeps the Y
    step's monotonicity meaningful and Z's columns comparable for the logit lens and atlas.
    """
    d, k = ay.shape
    if yy.shape != (k, k):
        raise ConfigError(f"update_z: ay {tuple(ay.shape)} and yy {tuple(yy.shape)} disagree")
    z = _gram_solve(yy, ay.T.to(torch.float64), cfg.eps).T  # yy symmetric: Zᵀ = (YYᵀ)⁻¹ (AYᵀ)ᵀ
    m = cfg.keep(d)
    if m < d:
        idx = torch.topk(z.abs(), m, dim=0, sorted=False).indices
        z = torch.zeros_like(z).scatter_(0, idx, z.gather(0, idx))
    norm = torch.linalg.vector_norm(z, dim=0)
    z = z / torch.where(norm > 0, norm, 1.0)[None, :]
    return z.to(torch.float32), norm.to(torch.float32)


@torch.no_grad()
def rescale_y(y_s: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``diag(scale) Y_s``: moves the column norms taken out of ``Z`` into ``Y``."""
    return y_s * scale.to(y_s)[:, None]


@torch.no_grad()
def update_y(a_s: Array, y_s: torch.Tensor, z: torch.Tensor, cfg: SNMFConfig) -> torch.Tensor:
    """One multiplicative semi-NMF step for ``Y_s ≥ 0`` with ``Z`` fixed.

    Ding, Li & Jordan (2010), written for ``A ≈ Z Y`` (their ``X ≈ F Gᵀ`` with ``G = Yᵀ``):
    ``Y ← Y ⊙ sqrt(([ZᵀA]⁺ + [ZᵀZ]⁻ Y) / ([ZᵀA]⁻ + [ZᵀZ]⁺ Y + eps))``, with ``M⁺ = max(M, 0)``
    and ``M⁻ = max(-M, 0)``. Nonnegativity is automatic and the loss does not increase.
    Entries below ``_Y_FLUSH`` become exactly 0 (see there).
    """
    a_s = _f32(a_s)
    y = _f32(y_s, a_s.device)
    z = _f32(z, a_s.device)
    q = z.T @ z
    num = z.T @ a_s  # [k, T]
    den = (-num).clamp_min_(0.0)
    num.clamp_min_(0.0)
    num.addmm_((-q).clamp_min(0.0), y)
    den.addmm_(q.clamp_min(0.0), y).add_(cfg.eps)
    y = num.div_(den).sqrt_().mul_(y)
    return y.masked_fill_(y < _Y_FLUSH, 0.0)


@torch.no_grad()
def transform(a: Array, z: Array, sweeps: int = 20, eps: float = 1e-9) -> torch.Tensor:
    """Feature coefficients ``Y ≥ 0 [k, T]`` of new tokens ``A [d, T]`` under a fitted ``Z``:
    ``min ||A - ZY||`` with ``Z`` fixed, i.e. nonnegative least squares per token. This is
    what gives SNMF features statistics over tokens the factorisation never saw.

    Cyclic coordinate descent on ``½yᵀQy - bᵀy`` (``Q = ZᵀZ``, ``b = Zᵀa``), all tokens at
    once, from the relu'd least-squares solution: it reaches scipy's NNLS to float32 precision
    in ~10 sweeps, where the fit's multiplicative update is still ~1% off after 300.
    """
    a = _f32(a)
    z = _f32(z, a.device)
    y = init_y(a, z, SNMFConfig(k=z.shape[1], init="svd", eps=eps))
    q = z.T @ z
    diag = q.diagonal().clamp_min(eps)
    grad = q @ y - z.T @ a
    for _ in range(sweeps):
        for j in range(q.shape[0]):
            new = (y[j] - grad[j] / diag[j]).clamp_min_(0.0)
            grad.addr_(q[:, j], new - y[j])
            y[j] = new
    return y


@torch.no_grad()
def shard_loss(a_s: Array, z: torch.Tensor, y_s: torch.Tensor) -> float:
    """``||A_s - Z Y_s||²_F``, residual in float32 blocks, summed as in :func:`_sq_norm`.

    Formed explicitly rather than from the reductions: ``||A||² - 2⟨Z, AYᵀ⟩ + ...`` cancels
    and would lose the small losses that the stopping rule compares.
    """
    a_s = _f32(a_s)
    z = _f32(z, a_s.device)
    y_s = _f32(y_s, a_s.device)
    total = 0.0
    for s in range(0, a_s.shape[1], _CHUNK):
        r = torch.addmm(a_s[:, s : s + _CHUNK], z, y_s[:, s : s + _CHUNK], alpha=-1.0)
        total += float(r.square_().sum(0).double().sum())
    return total


# --------------------------------------------------------------------------- driver


class ShardBackend(Protocol):
    """Where the token shards live: this process (:class:`LocalShards`) or Ray actors.

    Lists are per shard, in shard order; a backend over several workers concatenates its
    workers' lists in order. ``best_y`` may also return the concatenated ``[k, T]``.
    """

    def n_tokens(self) -> int: ...
    def columns(self, idx: np.ndarray) -> torch.Tensor: ...
    def init(self, z: torch.Tensor) -> None: ...
    def norms(self) -> list[float]: ...
    def reductions(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]: ...
    def step(self, z: torch.Tensor, scale: torch.Tensor) -> list[float]: ...
    def keep_best(self) -> None: ...
    def best_y(self) -> list[torch.Tensor] | torch.Tensor: ...


class LocalShards:
    """Shards ``A_s [d, T_s]`` held in this process with their ``Y_s``: the worker side.

    A Ray actor wraps one of these over its shards; :func:`fit` uses one over all of them.
    """

    def __init__(self, parts: Sequence[Array], cfg: SNMFConfig):
        self.parts = [_f32(p) for p in parts]
        if not self.parts or any(p.dim() != 2 for p in self.parts):
            raise ConfigError("LocalShards needs at least one [d, T_s] shard")
        if len({p.shape[0] for p in self.parts}) != 1:
            raise ConfigError(f"shards disagree on d: {[tuple(p.shape) for p in self.parts]}")
        self.cfg = cfg
        self.ys: list[torch.Tensor] = []
        self.best: list[torch.Tensor] = []

    def n_tokens(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def columns(self, idx: np.ndarray) -> torch.Tensor:
        """Columns ``idx`` (indices into this backend's shards, concatenated) as ``[d, n]``."""
        idx = np.asarray(idx, dtype=np.int64)
        out, start = [], 0
        for p in self.parts:
            mine = idx[(idx >= start) & (idx < start + p.shape[1])] - start
            out.append(p.index_select(1, torch.as_tensor(mine, device=p.device)))
            start += p.shape[1]
        return torch.cat(out, dim=1)

    def init(self, z: torch.Tensor) -> None:
        self.ys = [init_y(p, z, self.cfg) for p in self.parts]
        self.best = list(self.ys)

    def norms(self) -> list[float]:
        return [_sq_norm(p) for p in self.parts]

    def reductions(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        return [
            shard_reductions(p, y, norm=False) for p, y in zip(self.parts, self.ys, strict=True)
        ]

    def step(self, z: torch.Tensor, scale: torch.Tensor) -> list[float]:
        """Rescale and update every ``Y_s``; the shards' losses with the new ``Y_s``."""
        self.ys = [update_y(p, rescale_y(y, scale), z, self.cfg)
                   for p, y in zip(self.parts, self.ys, strict=True)]  # fmt: skip
        return [shard_loss(p, z, y) for p, y in zip(self.parts, self.ys, strict=True)]

    def keep_best(self) -> None:
        self.best = list(self.ys)  # steps make new tensors: references are enough

    def best_y(self) -> list[torch.Tensor]:
        return list(self.best)


@torch.no_grad()
def run(
    backend: ShardBackend,
    cfg: SNMFConfig,
    callback: Callable[[int, float], None] | None = None,
) -> SNMFResult:
    """The SNMF loop over any shard backend; only ``[d, k]``-sized data crosses to the driver.

    Reductions are summed and losses added in shard order (float64, losses exactly with
    ``fsum``), so the result does not depend on how shards are spread over workers.
    ``callback(iteration, loss)`` is called after every iteration (progress, timing).
    """
    n = backend.n_tokens()
    if n < 1:
        raise ConfigError("SNMF needs at least one token")
    z = init_z(backend.columns(init_sample_columns(n, cfg)), cfg)
    backend.init(z)
    norm2 = math.fsum(backend.norms())
    history: list[float] = []
    best_loss, best_iter, best_z = math.inf, -1, z
    ref, stale = math.inf, 0
    for it in tqdm(range(cfg.iters), desc="SNMF", unit="iter", disable=None):
        red = backend.reductions()
        ay = red[0][0].clone()
        yy = red[0][1].clone()
        for r in red[1:]:
            ay += r[0].to(ay.device)
            yy += r[1].to(yy.device)
        z, scale = update_z(ay, yy, cfg)
        loss = math.fsum(backend.step(z, scale))
        history.append(loss)
        if callback is not None:
            callback(it, loss)
        if loss < best_loss:
            best_loss, best_iter, best_z = loss, it, z
            backend.keep_best()
        # progress = tol below the loss at the last progress, so small gains add up and count
        if loss < ref * (1.0 - cfg.tol):
            ref, stale = loss, 0
        else:
            stale += 1
        if stale >= cfg.patience:
            break
    y = backend.best_y()
    y = torch.cat(list(y), dim=1) if isinstance(y, list | tuple) else y
    rel = math.sqrt(best_loss / norm2) if norm2 > 0 else 0.0
    return SNMFResult(z=best_z, y=y, loss_history=history, best_iter=best_iter, rel_error=rel)


def fit(
    a: Array,
    cfg: SNMFConfig,
    shards: int = 1,
    callback: Callable[[int, float], None] | None = None,
) -> SNMFResult:
    """Factorise ``a [d, T]`` in this process: :func:`run` over ``shards`` contiguous blocks.

    The reference for distributed runs: any ``shards`` gives the same result up to float32
    rounding of the per-shard products.
    """
    a = _f32(a)
    if a.dim() != 2 or a.shape[1] == 0:
        raise ConfigError(f"fit: a must be [d, T] with T >= 1, got {tuple(a.shape)}")
    if not 1 <= shards <= a.shape[1]:
        raise ConfigError(f"fit: shards={shards} must be in 1..{a.shape[1]} (the tokens)")
    return run(LocalShards(torch.tensor_split(a, shards, dim=1), cfg), cfg, callback)
