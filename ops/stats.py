"""Streaming per-neuron statistics and top-k examples, mergeable and deterministic.

One place for this numerics: the worker updates a :class:`NeuronAccumulator` per layer
from each batch (torch, on the model's device), turns it into a :class:`StatsPartial`
per shard (numpy), and the driver merges the shard partials in shard order with
:func:`merge_partials` (float64, Chan/Pébay formulas) and finalises them with
:func:`finalize`.

Moments are centred sums (``M_p = Σ (x - mean)^p``) rather than raw power sums: raw
sums lose every digit of the variance when ``|mean| ≫ std``. A batch's centred sums
are taken in float32 around the batch mean (small batches, so float32 holds) and
merged in float64.

Top-k is canonical: examples are ordered by value, then by *smaller* token position,
so that the result does not depend on sort stability, batch boundaries or which worker
saw which shard. Both are packed into one int64 key (monotone float32 bits << 31 |
reversed position), unique per token, so every correct selection gives the same set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ops import fused, kernels
from ops.errors import ConfigError

#: Positions must fit in 31 bits to be packed next to a float32 in one int64 key.
MAX_POSITIONS = 2**31
_POS_MASK = MAX_POSITIONS - 1
#: Key of an empty top-k slot (fewer than k tokens seen).
EMPTY_KEY = np.iinfo(np.int64).min


@dataclass(frozen=True)
class HistSpec:
    """Fixed histogram bins, symmetric around 0 and log-spaced, cut at float32 bit boundaries.

    Each side has ``bins // 2`` bins: ``[0, e1)``, then ``2**mbits`` bins per octave from
    ``e1 ≈ lo`` upwards (the last one open-ended); negative bins mirror them,
    ``(-e[i+1], -e[i]]``. Edges are floats whose low mantissa bits are zero, so a value's
    bin is a shift of its bit pattern: one integer op per activation instead of a binary
    search, and exactly the bin that a search over the stored edges gives.
    """

    bins: int
    mbits: int
    base: int  # bit pattern of e1 >> (23 - mbits)

    @property
    def half(self) -> int:
        return self.bins // 2

    @property
    def mshift(self) -> int:
        return 23 - self.mbits

    def edges(self) -> np.ndarray:
        """``bins + 1`` float32 edges, ascending; the outermost bins also hold values beyond."""
        steps = (self.base + np.arange(self.half, dtype=np.int64)) << self.mshift
        pos = np.concatenate([[0.0], steps.astype(np.int32).view(np.float32)]).astype(np.float32)
        return np.concatenate([-pos[:0:-1], pos]).astype(np.float32)


def hist_spec(bins: int, lo: float = 1e-3, hi: float = 1e4) -> HistSpec:
    """Finest power-of-two bins per octave such that ``[lo, hi]`` fits in ``bins // 2`` bins."""
    if bins < 4 or bins % 2:
        raise ConfigError(f"hist bins must be an even number >= 4, got {bins}")
    if not 0 < lo < hi:
        raise ConfigError(f"need 0 < hist_min < hist_max, got {lo}, {hi}")
    octaves = float(np.log2(hi / lo))
    mbits = 0
    while mbits < 7 and (2 ** (mbits + 1)) * octaves <= bins // 2 - 1:
        mbits += 1
    lo_bits = int(np.float32(lo).view(np.int32))
    return HistSpec(bins=bins, mbits=mbits, base=lo_bits >> (23 - mbits))


def bin_index_np(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Reference bin of each value from the stored edges alone (binary search)."""
    x = np.asarray(x, dtype=np.float32)
    half = (len(edges) - 1) // 2
    pos_edges = edges[half:]
    q = np.clip(np.searchsorted(pos_edges, np.abs(x), side="right") - 1, 0, half - 1)
    return np.where(x < 0, half - 1 - q, half + q)


def bin_index(x: torch.Tensor, spec: HistSpec) -> torch.Tensor:
    """Bin of each float32 value by its bit pattern (torch; same bins as the numba kernel)."""
    bits = x.contiguous().view(torch.int32) & 0x7FFFFFFF
    q = ((bits >> spec.mshift) - (spec.base - 1)).clamp_(0, spec.half - 1).to(torch.int64)
    return torch.where(x < 0, spec.half - 1 - q, spec.half + q)


# ---------------------------------------------------------------------------- keys


def _sortable_int32(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (-0.0 folded onto +0.0)."""
    bits = v.contiguous().view(torch.int32)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return torch.where(key == -1, torch.zeros_like(key), key)


def pack_keys(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (value desc, position asc) when sorted descending."""
    k32 = _sortable_int32(values.to(torch.float32)).to(torch.int64)
    return (k32 << 31) | (_POS_MASK - positions.to(torch.int64))


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_keys`; empty slots give (NaN, -1)."""
    empty = keys == EMPTY_KEY
    k32 = (keys >> 31).to(torch.int32)
    bits = torch.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
    values = bits.view(torch.float32).clone()
    positions = _POS_MASK - (keys & _POS_MASK)
    values[empty] = float("nan")
    positions[empty] = -1
    return values, positions


def topk_merge(
    keys: torch.Tensor, cand_neuron: torch.Tensor, cand_keys: torch.Tensor, k: int
) -> torch.Tensor:
    """Merge sorted ``keys [d, k]`` with candidate (neuron, key) pairs; returns new ``[d, k]``.

    Keys are unique, so the result is independent of the sort algorithm.
    """
    d = keys.shape[0]
    neuron = torch.cat(
        [torch.arange(d, device=keys.device).repeat_interleave(k), cand_neuron.to(torch.int64)]
    )
    allk = torch.cat([keys.reshape(-1), cand_keys])
    # order by neuron asc, then key desc: sort by key, then stable sort by neuron
    o1 = torch.argsort(allk, descending=True)
    o2 = torch.argsort(neuron[o1], stable=True)
    order = o1[o2]
    counts = k + torch.bincount(cand_neuron.to(torch.int64), minlength=d)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=keys.device) - starts.repeat_interleave(counts)
    return allk[order[rank < k]].reshape(d, k)


# ---------------------------------------------------------------------------- partials


@dataclass
class StatsPartial:
    """Mergeable statistics of one layer over some tokens (numpy, host memory).

    Shapes below are for one layer; layers may be stacked in a leading axis ([L, d, ...])
    and every function here works on the stack unchanged.
    """

    n: int
    mean: np.ndarray  # float64 [d]
    m2: np.ndarray  # float64 [d]   Σ (x - mean)^2
    m3: np.ndarray  # float64 [d]
    m4: np.ndarray  # float64 [d]
    vmin: np.ndarray  # float32 [d]
    vmax: np.ndarray  # float32 [d]
    n_pos: np.ndarray  # int64 [d]   count of x > 0
    hist: np.ndarray  # int32 per shard (< 2**31 tokens), int64 once merged  [d, bins]
    top_values: np.ndarray  # float32 [d, k]  descending, NaN for empty slots
    top_positions: np.ndarray  # int64 [d, k]  -1 for empty slots

    ARRAYS = ("mean", "m2", "m3", "m4", "vmin", "vmax", "n_pos", "hist", "top_values",
              "top_positions")  # fmt: skip

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {name: getattr(self, name) for name in self.ARRAYS}
        out["n"] = np.asarray(self.n, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> StatsPartial:
        return cls(
            n=int(np.asarray(a["n"]).reshape(-1)[0]),
            **{name: np.asarray(a[name]) for name in cls.ARRAYS},
        )


def _moments_merge(
    na: float, ma: np.ndarray, a2: np.ndarray, a3: np.ndarray, a4: np.ndarray,
    nb: float, mb: np.ndarray, b2: np.ndarray, b3: np.ndarray, b4: np.ndarray,
):  # fmt: skip
    """Pébay's pairwise update of centred sums up to order 4 (works for numpy and torch)."""
    n = na + nb
    if nb == 0:
        return n, ma, a2, a3, a4
    if na == 0:
        return n, mb, b2, b3, b4
    delta = mb - ma
    d_n = delta / n
    d_n2 = d_n * d_n
    mean = ma + d_n * nb
    m2 = a2 + b2 + delta * d_n * na * nb
    m3 = a3 + b3 + delta * d_n2 * na * nb * (na - nb) + 3.0 * d_n * (na * b2 - nb * a2)
    m4 = (
        a4 + b4
        + delta * d_n2 * d_n * na * nb * (na * na - na * nb + nb * nb)
        + 6.0 * d_n2 * (na * na * b2 + nb * nb * a2)
        + 4.0 * d_n * (na * b3 - nb * a3)
    )  # fmt: skip
    return n, mean, m2, m3, m4


def merge_topk_np(
    values: Sequence[np.ndarray], positions: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Canonical top-k of several ``[..., k_i]`` candidate sets (value desc, position asc)."""
    lead = values[0].shape[:-1]
    v = torch.from_numpy(np.concatenate(values, axis=-1).astype(np.float32))
    v = v.reshape(int(np.prod(lead)), -1)
    p = torch.from_numpy(np.concatenate(positions, axis=-1).astype(np.int64))
    p = p.reshape(int(np.prod(lead)), -1)
    keys = pack_keys(torch.nan_to_num(v, nan=0.0), p.clamp(min=0))
    keys[p < 0] = EMPTY_KEY
    top = torch.topk(keys, k, dim=1).values  # unique keys: deterministic
    tv, tp = unpack_keys(top)
    return tv.numpy().reshape(*lead, k), tp.numpy().reshape(*lead, k)


def merge_partials(parts: Sequence[StatsPartial]) -> StatsPartial:
    """Merge partials left to right (the fixed order is what makes the atlas reproducible)."""
    if not parts:
        raise ConfigError("merge_partials needs at least one partial")
    acc = parts[0]
    n, mean, m2, m3, m4 = acc.n, acc.mean, acc.m2, acc.m3, acc.m4
    vmin, vmax, n_pos = acc.vmin.copy(), acc.vmax.copy(), acc.n_pos.copy()
    hist = acc.hist.astype(np.int64)  # shard partials count in int32
    for p in parts[1:]:
        n, mean, m2, m3, m4 = _moments_merge(n, mean, m2, m3, m4, p.n, p.mean, p.m2, p.m3, p.m4)
        np.fmin(vmin, p.vmin, out=vmin)
        np.fmax(vmax, p.vmax, out=vmax)
        n_pos += p.n_pos
        hist += p.hist
    k = parts[0].top_values.shape[-1]
    tv, tp = merge_topk_np([p.top_values for p in parts], [p.top_positions for p in parts], k)
    return StatsPartial(int(n), mean, m2, m3, m4, vmin, vmax, n_pos, hist, tv, tp)


def stack_partials(parts: Sequence[StatsPartial]) -> dict[str, np.ndarray]:
    """One partial per layer as arrays with a leading layer axis (``StatsPartial.from_arrays``
    reads them back as one stacked partial, which every function here accepts)."""
    out = {name: np.stack([getattr(p, name) for p in parts]) for name in StatsPartial.ARRAYS}
    out["n"] = np.asarray(parts[0].n, dtype=np.int64)
    return out


def finalize(p: StatsPartial, dead_frequency: float = 1e-6, massive_threshold: float = 100.0
             ) -> dict[str, np.ndarray]:  # fmt: skip
    """Atlas statistics from a merged partial. Constant neurons get skew = kurt = 0, not NaN.

    ``var`` is the population variance, ``kurt`` is Pearson's (normal = 3, not excess).
    """
    n = max(p.n, 1)
    var = p.m2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = var > 0
        skew = np.where(ok, (p.m3 / n) / np.where(ok, var, 1.0) ** 1.5, 0.0)
        kurt = np.where(ok, (p.m4 / n) / np.where(ok, var, 1.0) ** 2, 0.0)
    frac = p.n_pos / n
    max_abs = np.fmax(np.abs(p.vmin.astype(np.float64)), np.abs(p.vmax.astype(np.float64)))
    return {
        "count": np.full(p.mean.shape, p.n, dtype=np.int64),
        "mean": p.mean,
        "var": var,
        "skew": skew,
        "kurt": kurt,
        "min": p.vmin,
        "max": p.vmax,
        "frac_active": frac,
        "hist": p.hist,
        "dead": (frac < dead_frequency) | (max_abs == 0),
        "massive": max_abs >= massive_threshold,
    }


# ---------------------------------------------------------------------------- accumulator


def _centred_from_shifted(s: np.ndarray, n: int, shift: np.ndarray):
    """Batch mean and centred sums from sums of powers of (x - shift), all float64."""
    delta = s[0] / n
    d2 = delta * delta
    m2 = s[1] - n * d2
    m3 = s[2] - 3.0 * delta * s[1] + 2.0 * n * d2 * delta
    m4 = s[3] - 4.0 * delta * s[2] + 6.0 * d2 * s[1] - 3.0 * n * d2 * d2
    return shift + delta, np.maximum(m2, 0.0), m3, np.maximum(m4, 0.0)


class NeuronAccumulator:
    """Streaming statistics of one layer's neurons, updated batch by batch.

    ``backend="numba"`` (CPU) runs the fused one-pass kernel of :mod:`ops.kernels`;
    ``backend="triton"`` (GPU) the fused kernels of :mod:`ops.fused` (no host syncs);
    ``backend="torch"`` runs eager torch ops on the tensor's device (the reference).
    ``"auto"`` picks numba on CPU and Triton on CUDA when they are installed.
    """

    def __init__(self, d: int, k: int, spec: HistSpec, device: torch.device | str = "cpu",
                 backend: str = "auto", tiling: fused.Tiling | None = None):  # fmt: skip
        self.d, self.k, self.spec = d, k, spec
        self.device = dev = torch.device(device)
        if backend == "auto":
            if dev.type == "cpu":
                backend = "numba" if kernels.AVAILABLE else "torch"
            else:
                backend = "triton" if fused.available(dev) else "torch"
        ok = {"torch": True, "numba": dev.type == "cpu" and kernels.AVAILABLE,
              "triton": fused.available(dev)}  # fmt: skip
        if not ok.get(backend, False):
            raise ConfigError(f"backend {backend!r} is not available on {dev}")
        self.backend = backend
        self._fused = (
            fused.FusedUpdate(d, k, dev, tiling or fused.Tiling()) if backend == "triton" else None
        )
        f64 = dict(dtype=torch.float64, device=dev)
        self.n = 0
        self.mean = torch.zeros(d, **f64)
        self.m2 = torch.zeros(d, **f64)
        self.m3 = torch.zeros(d, **f64)
        self.m4 = torch.zeros(d, **f64)
        self.vmin = torch.full((d,), float("inf"), device=dev)
        self.vmax = torch.full((d,), float("-inf"), device=dev)
        self.n_pos = torch.zeros(d, dtype=torch.int64, device=dev)
        # int32 halves the cache footprint of the scatter; a shard has < 2**31 tokens
        self.hist = torch.zeros(d, spec.bins, dtype=torch.int32, device=dev)
        self.keys = torch.full((d, k), EMPTY_KEY, dtype=torch.int64, device=dev)
        # numba path: values of ``keys`` (the kernel compares floats, then keys on a hit)
        self._vals = np.full((d, k), -np.inf, dtype=np.float32)
        self._scratch = np.empty(d, dtype=np.uint32)  # one widened row (stays in L1)
        self._bins = np.empty(d, dtype=np.int64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Add ``x [T, d]`` (any float dtype) observed at flat token ``positions [T]``."""
        rows = torch.arange(x.shape[0], device=x.device)
        self.update_rows(x, rows, positions)

    @torch.no_grad()
    def update_rows(self, act: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Add rows ``act[rows]`` of a ``[N, d]`` activation batch, observed at ``positions``.

        Taking the whole batch plus row indices lets the CPU kernel read the model's
        bfloat16 buffer in place instead of gathering and widening a copy first.
        """
        t = int(rows.shape[0])
        if t == 0:
            return
        if self.backend == "triton":  # merges into the state in place
            self._fused(self, act, rows.to(torch.int64), positions.to(self.device, torch.int64))
            self.n += t
            return
        if self.backend == "numba":
            mean, b2, b3, b4 = self._pass_numba(act, rows, positions)
        else:
            x = act.index_select(0, rows).to(torch.float32).contiguous()
            mean, b2, b3, b4 = self._pass_torch(x, positions)
        self.n, self.mean, self.m2, self.m3, self.m4 = _moments_merge(
            float(self.n), self.mean, self.m2, self.m3, self.m4, float(t), mean, b2, b3, b4
        )
        self.n = int(self.n)

    def _pass_torch(self, x: torch.Tensor, positions: torch.Tensor):
        bmean = x.sum(0, dtype=torch.float64) / x.shape[0]
        c = x - bmean.to(torch.float32)
        c2 = c * c
        b2 = c2.sum(0, dtype=torch.float64)
        b3 = (c2 * c).sum(0, dtype=torch.float64)
        b4 = (c2 * c2).sum(0, dtype=torch.float64)
        bmin, bmax = torch.aminmax(x, dim=0)
        torch.minimum(self.vmin, bmin, out=self.vmin)
        torch.maximum(self.vmax, bmax, out=self.vmax)
        self.n_pos += (x > 0).sum(0)
        flat = (
            bin_index(x, self.spec) + torch.arange(self.d, device=x.device)[None] * self.spec.bins
        )
        counts = torch.bincount(flat.view(-1), minlength=self.d * self.spec.bins)
        self.hist += counts.view(self.d, self.spec.bins).to(torch.int32)
        # top-k: only values reaching the current k-th (or, before k are seen, the batch's
        # own k-th) can enter; keys make ties resolve by position
        full = bool((self.keys[:, -1] != EMPTY_KEY).all())
        if full:
            thr = unpack_keys(self.keys[:, -1])[0]
        else:
            thr = torch.topk(x, min(self.k, x.shape[0]), dim=0, sorted=False).values.amin(0)
        tok, neuron = torch.nonzero(x >= thr, as_tuple=True)
        if tok.numel():
            cand = pack_keys(x[tok, neuron], positions.to(x.device)[tok])
            self.keys = topk_merge(self.keys, neuron, cand, self.k)
        return bmean, b2, b3, b4

    def _pass_numba(self, act: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor):
        act = act.contiguous()
        if act.dtype == torch.bfloat16:
            a, wide = act.view(torch.int16).numpy(), False
        else:
            a, wide = act.to(torch.float32).numpy(), True
        rows_np = rows.to(torch.int64).numpy()
        # power sums around a value near the mean stay well-scaled: the running mean, or
        # for the first batch its first row
        first = act[int(rows_np[0])].to(torch.float64)
        shift = (self.mean if self.n else first).numpy()
        s = np.zeros((4, self.d), dtype=np.float64)
        kernels.update_rows(
            a, wide, rows_np, positions.to(torch.int64).contiguous().numpy(), shift, s,
            self.vmin.numpy(), self.vmax.numpy(), self.n_pos.numpy(), self.hist.numpy(),
            self.spec.half, self.spec.base, self.spec.mshift, self.keys.numpy(), self._vals,
            self._scratch, self._bins,
        )  # fmt: skip
        mean, b2, b3, b4 = _centred_from_shifted(s, int(rows_np.shape[0]), shift)
        return tuple(torch.from_numpy(a) for a in (mean, b2, b3, b4))

    def partial(self) -> StatsPartial:
        """Snapshot as host numpy arrays."""
        tv, tp = unpack_keys(self.keys)

        def cpu(a: torch.Tensor) -> np.ndarray:
            return a.detach().cpu().numpy().copy()

        return StatsPartial(
            n=self.n, mean=cpu(self.mean), m2=cpu(self.m2), m3=cpu(self.m3), m4=cpu(self.m4),
            vmin=cpu(self.vmin), vmax=cpu(self.vmax), n_pos=cpu(self.n_pos), hist=cpu(self.hist),
            top_values=cpu(tv), top_positions=cpu(tp),
        )  # fmt: skip
