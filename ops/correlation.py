"""Exact streaming neuron-neuron correlations between models fed the same tokens.

A worker's :class:`FamilyMoments` keeps the co-moments of tiles of neurons (rows: whole
layers of model A; columns: every compared layer of model B) across all the batches and
shards it is given: one GEMM per tile and batch on shifted and scaled inputs (float32, or
float16/bfloat16 on CUDA, always accumulated in float32), folded into float64. Centred
:class:`CoMoments` of different workers merge with Chan's formulas, in a fixed order, so
the result does not depend on how the work was split (beyond float64 rounding).

The rotation baseline needs no extra pass over tokens: correlations of A's neurons with
the rotated neurons ``b @ Q`` of B follow from the moments, ``C_ab Q`` and
``diag(Qᵀ C_bb Q)``, so each model's within-layer covariances are kept too (own tiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ops.errors import ConfigError
from ops.plan import PairTile, Tile


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


# ---------------------------------------------------------------------------- at scale


_IN_PLACE: dict[tuple[str, int, bool], bool] = {}
"""Whether this torch accumulates ``c += aᵀ·b`` in place, per (device type, dims, reduced
precision inputs): learnt from the first try (see :func:`accumulate_in_place`)."""


def accumulate_in_place(c: torch.Tensor, at: torch.Tensor, b: torch.Tensor) -> bool:
    """``c += at @ b`` (batched for 3-d) in float32 ``c``, **in place**, with float32
    accumulation whatever ``at``/``b``'s dtype; ``False`` (and ``c`` untouched) where this
    torch cannot, and the caller adds a product instead.

    A GEMM with ``beta = 1`` adds the product to ``c`` as it writes it; ``c += torch.mm(...,
    out_dtype=float32)`` writes a full float32 temporary and reads it again (5.4 GB per update
    for a GPT-2-small pair on a GPU, ~10% off update ÷ GEMM). Reduced-precision inputs need
    ``addmm``/``baddbmm`` with ``out_dtype`` and ``out=c``: CUDA only, and older torch
    releases insist that ``c`` has the inputs' dtype. The first call per kind tries and
    remembers the answer; the check fails before any work is queued, so ``c`` is unchanged.
    """
    key = (c.device.type, c.dim(), at.dtype != torch.float32)
    if _IN_PLACE.get(key) is False:
        return False
    try:
        if not key[2]:
            (c.addmm_ if c.dim() == 2 else c.baddbmm_)(at, b)
        else:
            op = torch.addmm if c.dim() == 2 else torch.baddbmm
            op(c, at, b, out_dtype=torch.float32, out=c)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError):
        if _IN_PLACE.get(key):  # it worked before: a real error
            raise
        _IN_PLACE[key] = False
        return False
    _IN_PLACE[key] = True
    return True


class FamilyMoments:
    """Co-moments of many tiles over the same tokens, held across every batch and shard a
    worker is given.

    Per batch and model: the rows of the model's layers this accumulator reads are
    concatenated into one ``[T, D]`` matrix, shifted and scaled once (by the first batch's
    mean and std, fixed thereafter), cast once to ``matmul_dtype``, and column sums of it
    and of its squares are added. Per pair tile: **one** GEMM ``Yaᵀ·Yb`` (float32
    accumulation); per own tile: one batched GEMM over its layers. The float32 products are
    folded into the float64 totals every ``flush_tokens`` tokens (``None``: every batch, in
    row chunks, so no float32 copy of the state is kept: the CPU default, where the GEMM
    dwarfs the fold). :meth:`raw` / :meth:`load_raw` are the exact state for checkpoints;
    :meth:`moments` the centred float64 co-moments.

    ``layers[m]`` lists the compared layers of model ``m`` (tile positions index into it),
    ``d[m]`` its neurons per layer.
    """

    def __init__(self, tiles: list[Tile], layers: dict[int, list[int]], d: dict[int, int],
                 device: torch.device | str = "cpu", matmul_dtype: torch.dtype = torch.float32,
                 flush_tokens: int | None = None, chunk_bytes: int = 256 << 20):  # fmt: skip
        dev = torch.device(device)
        if matmul_dtype != torch.float32 and dev.type != "cuda":
            raise ConfigError("reduced-precision co-moment products are for CUDA only")
        self.tiles, self.device, self.matmul_dtype = list(tiles), dev, matmul_dtype
        self.flush_tokens, self.chunk_bytes = flush_tokens, chunk_bytes
        # the layer positions of each model this accumulator reads, and their column span
        need: dict[int, set[int]] = {}
        for t in self.tiles:
            if isinstance(t, PairTile):
                need.setdefault(t.a, set()).update(range(t.lo, t.hi))
                need.setdefault(t.b, set()).update(range(len(layers[t.b])))
            else:
                need.setdefault(t.model, set()).update(range(t.lo, t.hi))
        self.pos = {m: sorted(p) for m, p in sorted(need.items())}
        self.d = {m: d[m] for m in self.pos}
        self.sites: tuple[tuple[int, int], ...] = tuple(
            (m, layers[m][p]) for m, ps in self.pos.items() for p in ps)  # fmt: skip
        f64 = dict(dtype=torch.float64, device=dev)
        self.n = 0
        self.shift: dict[int, torch.Tensor] = {}
        self.scale: dict[int, torch.Tensor] = {}
        self.s = {m: torch.zeros(len(ps) * self.d[m], **f64) for m, ps in self.pos.items()}
        self.q = {m: torch.zeros(len(ps) * self.d[m], **f64) for m, ps in self.pos.items()}
        self.c = {t: torch.zeros(self._shape(t), **f64) for t in self.tiles}
        full = flush_tokens is not None
        self._c32 = {t: torch.zeros(self._shape(t), dtype=torch.float32, device=dev)
                     for t in self.tiles} if full else {}  # fmt: skip
        self._pending = 0

    # column ranges of a tile inside its model's concatenated matrix
    def _cols(self, m: int, lo: int, hi: int) -> slice:
        ps, d = self.pos[m], self.d[m]
        i = ps.index(lo)
        assert ps[i : i + hi - lo] == list(range(lo, hi)), "a tile's layers are contiguous"
        return slice(i * d, (i + hi - lo) * d)

    def _shape(self, t: Tile) -> tuple[int, ...]:
        if isinstance(t, PairTile):
            return ((t.hi - t.lo) * self.d[t.a], len(self.pos[t.b]) * self.d[t.b])
        return (t.hi - t.lo, self.d[t.model], self.d[t.model])

    def state_bytes(self) -> int:
        """Bytes this accumulator holds on its device (float64 totals, float32 buffers)."""
        n = sum(x.numel() for x in self.c.values())
        return 8 * n + 4 * sum(x.numel() for x in self._c32.values())

    @torch.no_grad()
    def update(self, acts: dict[tuple[int, int], torch.Tensor]) -> None:
        """Add one batch: ``acts[(model, layer)]`` are the recorded rows ``[T, d]`` of every
        site in :attr:`sites` (float32 or the model's dtype), on the same ``T`` tokens."""
        y: dict[int, torch.Tensor] = {}
        t = None
        for m in self.pos:
            x = torch.cat([acts[(m, lay)].float() for (mm, lay) in self.sites if mm == m], 1)
            t = x.shape[0]
            if t == 0:
                return
            if m not in self.shift:
                self.shift[m] = x.mean(0)
                std = x.std(0, correction=0)
                self.scale[m] = torch.where(std > 0, std, torch.ones_like(std))
            yf = x.sub_(self.shift[m]).div_(self.scale[m])  # in place: x is our own copy
            ones = torch.ones(t, dtype=torch.float32, device=yf.device)
            self.s[m] += ones @ yf  # a GEMV: ~10x faster than .sum(0) on CPU
            self.q[m] += torch.linalg.vector_norm(yf, dim=0).square_()  # no [T, D] temporary
            y[m] = yf if self.matmul_dtype == torch.float32 else yf.to(self.matmul_dtype)
        assert t is not None
        for tile in self.tiles:
            if isinstance(tile, PairTile):
                ya = y[tile.a][:, self._cols(tile.a, tile.lo, tile.hi)]
                self._add(tile, ya, y[tile.b])
            else:
                ym = y[tile.model][:, self._cols(tile.model, tile.lo, tile.hi)]
                v = ym.reshape(t, tile.hi - tile.lo, self.d[tile.model]).transpose(0, 1)
                self._add(tile, v, v)
        self.n += t
        self._pending += t
        if self.flush_tokens is not None and self._pending >= self.flush_tokens:
            self.flush()

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``aᵀ·b`` (batched for 3-d inputs) with float32 accumulation and output."""
        at = a.transpose(-2, -1)
        if self.matmul_dtype == torch.float32:
            return at @ b
        if a.dim() == 3:
            return torch.bmm(at, b, out_dtype=torch.float32)
        return torch.mm(at, b, out_dtype=torch.float32)

    def _add(self, tile: Tile, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.flush_tokens is not None:  # float32 buffer, folded into float64 now and then
            c32 = self._c32[tile]
            at = a.transpose(-2, -1)
            if c32.dim() == 2 and self.matmul_dtype == torch.float32:
                c32.addmm_(at, b)
            elif not (c32.device.type == "cuda" and accumulate_in_place(c32, at, b)):
                c32 += self._mm(a, b)
            return
        # fold every batch, a row chunk at a time: the float32 temporary stays small
        c = self.c[tile]
        rows = a.shape[-1]
        step = max(1, self.chunk_bytes // (4 * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)))
        for r in range(0, rows, step):
            c[..., r : r + step, :] += self._mm(a[..., r : r + step], b)

    def flush(self) -> None:
        for tile, c32 in self._c32.items():
            self.c[tile] += c32
            c32.zero_()
        self._pending = 0

    # ------------------------------------------------------------------ state

    def raw(self) -> dict[str, np.ndarray]:
        """The exact running state (for a checkpoint): :meth:`load_raw` continues from it."""
        self.flush()
        cpu = lambda x: x.detach().cpu().numpy()  # noqa: E731
        out: dict[str, np.ndarray] = {"n": np.asarray([self.n], np.int64)}
        for m in self.pos:
            out[f"s{m}"], out[f"q{m}"] = cpu(self.s[m]), cpu(self.q[m])
            if m in self.shift:
                out[f"shift{m}"], out[f"scale{m}"] = cpu(self.shift[m]), cpu(self.scale[m])
        for i, tile in enumerate(self.tiles):
            out[f"c{i}"] = cpu(self.c[tile])
        return out

    def load_raw(self, raw: dict[str, np.ndarray]) -> None:
        dev = self.device
        self.n = int(np.asarray(raw["n"]).reshape(-1)[0])
        for m in self.pos:
            self.s[m] = torch.as_tensor(raw[f"s{m}"], device=dev)
            self.q[m] = torch.as_tensor(raw[f"q{m}"], device=dev)
            if f"shift{m}" in raw:
                self.shift[m] = torch.as_tensor(raw[f"shift{m}"], device=dev)
                self.scale[m] = torch.as_tensor(raw[f"scale{m}"], device=dev)
        for i, tile in enumerate(self.tiles):
            c = torch.as_tensor(raw[f"c{i}"], device=dev)
            if tuple(c.shape) != self._shape(tile):
                raise ConfigError(f"checkpoint tile {i} has shape {tuple(c.shape)}, "
                                  f"expected {self._shape(tile)}")  # fmt: skip
            self.c[tile] = c
        self._pending = 0

    def load_moments(self, moments: dict[PairTile, CoMoments]) -> None:
        """Start from merged centred co-moments of every pair tile (workers that each took a
        range of the shards): the state is then that of one worker that saw them all, with
        the mean as shift and unit scale."""
        dev = self.device
        for tile, cm in moments.items():
            self.n = cm.n
            for m, cols, mean, m2 in ((tile.a, self._cols(tile.a, tile.lo, tile.hi), cm.mean_a,
                                       cm.m2_a), (tile.b, slice(None), cm.mean_b, cm.m2_b)):  # fmt: skip
                if m not in self.shift:
                    self.shift[m] = torch.zeros_like(self.s[m])
                    self.scale[m] = torch.ones_like(self.s[m])
                self.shift[m][cols] = torch.as_tensor(mean, dtype=torch.float64, device=dev)
                self.scale[m][cols] = 1.0
                self.s[m][cols] = 0.0
                self.q[m][cols] = torch.as_tensor(m2, dtype=torch.float64, device=dev)
            self.c[tile] = torch.as_tensor(cm.c, dtype=torch.float64, device=dev).clone()
        self._pending = 0

    def columns(self, m: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Mean and centred ``M2`` (float64, true units) of model ``m``'s columns, and ``n``."""
        n = max(self.n, 1)
        mu = (self.s[m] / n).cpu().numpy()
        sc = self.scale[m].double().cpu().numpy() if m in self.scale else 1.0
        sh = self.shift[m].double().cpu().numpy() if m in self.shift else 0.0
        m2 = np.maximum(self.q[m].cpu().numpy() - self.n * mu * mu, 0.0) * sc * sc
        return sh + mu * sc, m2, self.n

    def pair_moments(self, tile: PairTile) -> CoMoments:
        """A pair tile's centred co-moments on the host, mergeable across workers."""
        mean_a, m2_a, n = self.columns(tile.a)
        mean_b, m2_b, _ = self.columns(tile.b)
        ca = self._cols(tile.a, tile.lo, tile.hi)
        return CoMoments(n, mean_a[ca], mean_b, m2_a[ca], m2_b, self.centred(tile).cpu().numpy())

    def centred(self, tile: Tile, rows: slice | None = None,
                cols: slice | None = None) -> torch.Tensor:  # fmt: skip
        """The tile's centred float64 co-moment block in true units (pair tiles: optionally a
        block of rows and columns; own tiles: ``[L, d, d]``), on the accumulator's device."""
        self.flush()
        n = max(self.n, 1)
        if isinstance(tile, PairTile):
            ca = self._cols(tile.a, tile.lo, tile.hi)
            rows, cols = rows or slice(None), cols or slice(None)
            mua = (self.s[tile.a][ca] / n)[rows]
            mub = (self.s[tile.b] / n)[cols]
            sa = self.scale[tile.a][ca][rows].double()
            sb = self.scale[tile.b][cols].double()
            # in place on one copy: a block of rows may be a large part of the state
            c = self.c[tile][rows, cols].clone()
            c.addr_(mua, mub, alpha=-self.n)
            return c.mul_(sa[:, None]).mul_(sb[None, :])
        m = tile.model
        cm = self._cols(m, tile.lo, tile.hi)
        L, d = tile.hi - tile.lo, self.d[m]
        mu = (self.s[m][cm] / n).reshape(L, d)
        sc = self.scale[m][cm].double().reshape(L, d)
        c = self.c[tile].clone()
        c.baddbmm_(mu[:, :, None], mu[:, None, :], alpha=-self.n)
        return c.mul_(sc[:, :, None]).mul_(sc[:, None, :])
