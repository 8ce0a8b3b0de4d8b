"""Exact streaming neuron-neuron correlations between models fed the same tokens.

Per shard, :class:`CoMomentAccumulator` keeps centred co-moments of two blocks of
neurons (say layer La of model A and layer Lb of model B): batch-centred products in
float32 (one GEMM per batch), merged in float64 with Chan's formulas. Partials of any
grouping of shards merge into the same result (up to float64 rounding), so the atlas
does not depend on how the work was split.

The rotation baseline needs no extra pass over tokens: correlations of A's neurons with
the rotated neurons ``b @ Q`` of B follow from the merged moments, ``C_ab Q`` and
``diag(Qᵀ C_bb Q)``, so each model also keeps its within-layer covariance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ops.errors import ConfigError


@dataclass
class CoMoments:
    """Mergeable co-moments of two neuron blocks over some tokens (float64, host)."""

    n: int
    mean_a: np.ndarray  # [Da]
    mean_b: np.ndarray  # [Db]
    m2_a: np.ndarray  # [Da]   Σ (a - mean_a)^2
    m2_b: np.ndarray  # [Db]
    c: np.ndarray  # [Da, Db] Σ (a - mean_a)(b - mean_b)

    def merge(self, o: CoMoments) -> CoMoments:
        """Chan et al.'s pairwise update, extended to the cross term."""
        if o.n == 0:
            return self
        if self.n == 0:
            return o
        n = self.n + o.n
        da = o.mean_a - self.mean_a
        db = o.mean_b - self.mean_b
        f = self.n * o.n / n
        return CoMoments(
            n=n,
            mean_a=self.mean_a + da * (o.n / n),
            mean_b=self.mean_b + db * (o.n / n),
            m2_a=self.m2_a + o.m2_a + da * da * f,
            m2_b=self.m2_b + o.m2_b + db * db * f,
            c=self.c + o.c + np.outer(da, db) * f,
        )

    @property
    def T(self) -> CoMoments:  # noqa: N802 - as numpy's .T
        """The same moments seen from b's side."""
        return CoMoments(self.n, self.mean_b, self.mean_a, self.m2_b, self.m2_a, self.c.T)

    def pearson(self) -> np.ndarray:
        """r of every (a, b) pair; dead neurons of either side give 0."""
        return pearson(self.c, self.m2_a, self.m2_b, constant(self.m2_a, self.mean_a, self.n),
                       constant(self.m2_b, self.mean_b, self.n))  # fmt: skip

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.asarray([self.n], np.int64), "mean_a": self.mean_a, "mean_b": self.mean_b,
                "m2_a": self.m2_a, "m2_b": self.m2_b, "c": self.c}  # fmt: skip

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> CoMoments:
        return cls(int(np.asarray(a["n"]).reshape(-1)[0]), a["mean_a"], a["mean_b"], a["m2_a"],
                   a["m2_b"], a["c"])  # fmt: skip


def merge_comoments(parts: Sequence[CoMoments]) -> CoMoments:
    """Left fold in the given order (a fixed order makes the result reproducible bit for bit)."""
    if not parts:
        raise ConfigError("merge_comoments needs at least one partial")
    acc = parts[0]
    for p in parts[1:]:
        acc = acc.merge(p)
    return acc


def pearson(c: np.ndarray, m2_a: np.ndarray, m2_b: np.ndarray,
            dead_a: np.ndarray | None = None, dead_b: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Pearson r from co-moments; constant (dead) neurons correlate 0 with everything, not NaN."""
    den = np.sqrt(np.outer(m2_a, m2_b))
    ok = den > 0
    if dead_a is not None:
        ok &= ~dead_a[:, None]
    if dead_b is not None:
        ok &= ~dead_b[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(ok, c / np.where(ok, den, 1.0), 0.0)
    return np.clip(r, -1.0, 1.0)


def constant(m2: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    """Neurons that are constant over the tokens (dead): std below float32 resolution of the mean.

    Their correlations are set to 0; the float32 products of a nearly constant neuron are
    rounding noise, and would otherwise produce arbitrary r.
    """
    std = np.sqrt(np.maximum(m2, 0.0) / max(n, 1))
    return std <= 1e-6 * np.maximum(np.abs(mean), 1e-30)


class CoMomentAccumulator:
    """Co-moments of two activation blocks, updated batch by batch on their device.

    Sums are taken around a fixed shift (the first batch's mean): with the shift close
    to the mean this is as accurate as centring every batch, and the float64 running
    sum needs no per-batch rank-1 correction, so the GEMM dominates the cost. The
    exact centred co-moments are formed once, in :meth:`partial`.

    ``matmul_dtype`` is float32 by default; on GPU, float16/bfloat16 inputs use the
    tensor cores, and the product is still accumulated and returned in float32.
    """

    def __init__(self, da: int, db: int, device: torch.device | str = "cpu",
                 matmul_dtype: torch.dtype = torch.float32, flush_tokens: int = 8192):  # fmt: skip
        dev = torch.device(device)
        if matmul_dtype != torch.float32 and dev.type != "cuda":
            raise ConfigError("reduced-precision co-moment products are for CUDA only")
        self.device, self.matmul_dtype = dev, matmul_dtype
        f64 = dict(dtype=torch.float64, device=dev)
        self.n = 0
        self.shift_a: torch.Tensor | None = None
        self.shift_b: torch.Tensor | None = None
        self.s_a = torch.zeros(da, **f64)  # Σ (a - shift_a)
        self.s_b = torch.zeros(db, **f64)
        self.q_a = torch.zeros(da, **f64)  # Σ (a - shift_a)^2
        self.q_b = torch.zeros(db, **f64)
        self.c = torch.zeros(da, db, **f64)  # Σ (a - shift_a)(b - shift_b)ᵀ
        # products of up to flush_tokens tokens are summed in float32 (as one long GEMM
        # would), then folded into the float64 total
        self.flush_tokens = flush_tokens
        self._c32 = torch.zeros(da, db, dtype=torch.float32, device=dev)
        self._pending = 0

    def _flush(self) -> None:
        self.c += self._c32
        self._c32.zero_()
        self._pending = 0

    @torch.no_grad()
    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add ``a [T, Da]`` and ``b [T, Db]`` observed on the same ``T`` tokens."""
        t = a.shape[0]
        if t == 0:
            return
        if b.shape[0] != t:
            raise ConfigError(f"a and b must share tokens: {a.shape[0]} != {b.shape[0]}")
        a = a.to(torch.float32)
        b = b.to(torch.float32)
        if self.shift_a is None:
            self.shift_a = a.mean(0)
            self.shift_b = b.mean(0)
        ac = a - self.shift_a
        bc = b - self.shift_b
        if self.matmul_dtype == torch.float32:
            self._c32.addmm_(ac.T, bc)  # the GEMM accumulates in place: no extra pass
        else:  # tensor cores, float32 accumulation and output
            mm = torch.mm(
                ac.T.to(self.matmul_dtype), bc.to(self.matmul_dtype), out_dtype=torch.float32
            )
            self._c32 += mm
        self._pending += t
        if self._pending >= self.flush_tokens:
            self._flush()
        # column sums as GEMVs: ~10x faster than .sum(0) on CPU; float32 within a batch is
        # fine because the values are centred, and the running sums are float64
        ones = torch.ones(t, dtype=torch.float32, device=a.device)
        self.s_a += ones @ ac
        self.s_b += ones @ bc
        self.q_a += ones @ (ac * ac)
        self.q_b += ones @ (bc * bc)
        self.n += t

    def partial(self) -> CoMoments:
        """Centred co-moments (float64, host)."""
        self._flush()
        d_a, d_b = self.s_a.shape[0], self.s_b.shape[0]
        if self.n == 0:
            z = np.zeros
            return CoMoments(0, z(d_a), z(d_b), z(d_a), z(d_b), z((d_a, d_b)))
        cpu = lambda x: x.detach().cpu().numpy().astype(np.float64)  # noqa: E731
        n = self.n
        da, db = cpu(self.s_a) / n, cpu(self.s_b) / n
        return CoMoments(
            n=n,
            mean_a=cpu(self.shift_a) + da,
            mean_b=cpu(self.shift_b) + db,
            m2_a=np.maximum(cpu(self.q_a) - n * da * da, 0.0),
            m2_b=np.maximum(cpu(self.q_b) - n * db * db, 0.0),
            c=cpu(self.c) - n * np.outer(da, db),
        )


def random_rotation(d: int, seed: int) -> np.ndarray:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), float64 [d, d]."""
    g = np.random.default_rng(seed).standard_normal((d, d))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


def rotated_pearson(ab: CoMoments, bb_cov: np.ndarray, q: np.ndarray) -> np.ndarray:
    """r between A's neurons and B's neurons rotated by ``q`` (``b @ q``), from moments only.

    ``bb_cov`` is B's within-layer co-moment matrix Σ (b - mean)(b - mean)ᵀ on the same tokens.
    """
    c_rot = ab.c @ q
    m2_rot = np.einsum("ij,ik,kj->j", q, bb_cov, q)
    return pearson(c_rot, ab.m2_a, np.maximum(m2_rot, 0.0), constant(ab.m2_a, ab.mean_a, ab.n))


@dataclass
class BestPartners:
    """Per neuron of A: its best-correlated neuron in B (over all of B's layers)."""

    layer: np.ndarray  # int32 [Da]
    index: np.ndarray  # int32 [Da]
    max_corr: np.ndarray  # float64 [Da]
    min_corr: np.ndarray  # float64 [Da]

    @classmethod
    def empty(cls, d: int) -> BestPartners:
        return cls(np.full(d, -1, np.int32), np.full(d, -1, np.int32), np.full(d, -np.inf),
                   np.full(d, np.inf))  # fmt: skip

    def update(self, r: np.ndarray, layer: int) -> None:
        """Fold in one block ``r [Da, Db_layer]``; ties keep the earlier (layer, index)."""
        j = np.argmax(r, axis=1)
        best = r[np.arange(r.shape[0]), j]
        better = best > self.max_corr
        self.max_corr = np.where(better, best, self.max_corr)
        self.layer = np.where(better, layer, self.layer).astype(np.int32)
        self.index = np.where(better, j, self.index).astype(np.int32)
        self.min_corr = np.minimum(self.min_corr, r.min(axis=1))


def match(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching maximising total correlation (Hungarian); (perm, corr) per row.

    ``perm[i]`` is the column matched to row ``i`` (-1 when there are fewer columns).
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(r, maximize=True)
    perm = np.full(r.shape[0], -1, np.int64)
    perm[rows] = cols
    corr = np.where(perm >= 0, r[np.arange(r.shape[0]), np.maximum(perm, 0)], np.nan)
    return perm, corr
