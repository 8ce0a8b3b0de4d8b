"""Fused CPU kernel for the per-batch statistics update (numba).

The eager torch update makes ~20 passes over every activation (moments, min/max,
activation count, histogram, top-k threshold) and costs more than the forward pass on
a CPU. This kernel makes one pass, so recording costs a few percent on top of the
model. ``ops.stats`` keeps the torch version as the reference (and the GPU path);
``tests/ops/test_stats.py`` checks both give the same numbers.
"""

from __future__ import annotations

import numpy as np

try:
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps ops importable
    numba = None
    AVAILABLE = False


def _moments_update(
    x: np.ndarray,  # float32 [T, d]
    shift: np.ndarray,  # float64 [d]
    s: np.ndarray,  # float64 [4, d]   Σ c, Σ c², Σ c³, Σ c⁴ with c = x - shift
    vmin: np.ndarray,  # float32 [d]
    vmax: np.ndarray,  # float32 [d]
    npos: np.ndarray,  # int64 [d]
) -> None:
    """Shifted power sums, min, max and count of x > 0, token-major so the neuron loop vectorises.

    fastmath lets LLVM vectorise across neurons; each neuron's sums still run over tokens
    in order, so the result is reproducible run to run.
    """
    t_n, d = x.shape
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    for t in range(t_n):
        row = x[t]
        for j in range(d):
            v = row[j]
            c = np.float64(v) - shift[j]
            c2 = c * c
            s0[j] += c
            s1[j] += c2
            s2[j] += c2 * c
            s3[j] += c2 * c2
            vmin[j] = min(vmin[j], v)
            vmax[j] = max(vmax[j], v)
            npos[j] += 1 if v > 0 else 0


def _hist_topk_update(
    x: np.ndarray,  # float32 [T, d]
    xi: np.ndarray,  # the same memory viewed as int32
    positions: np.ndarray,  # int64 [T]  flat token positions (< 2**31)
    hist: np.ndarray,  # int32 [d, bins]  (per shard: < 2**31 tokens)
    half: int,
    base: int,
    mshift: int,
    keys: np.ndarray,  # int64 [d, k]  sorted descending, EMPTY_KEY padded (see ops.stats)
    vals: np.ndarray,  # float32 [d, k]  the values of keys (-inf where empty)
) -> None:
    """Histogram counts by bit pattern, and streaming top-k by insertion.

    The threshold rises as the top-k fills, so after the first few hundred tokens almost
    no activation gets past the single float compare. Keys are unique (value bits and
    position), so the result is the canonical top-k whatever the visiting order.
    """
    t_n, d = x.shape
    k = keys.shape[1]
    pos_mask = np.int64(2**31 - 1)
    for t in range(t_n):
        rpos = pos_mask - positions[t]
        for j in range(d):
            v = x[t, j]
            bits = xi[t, j]
            q = ((bits & 0x7FFFFFFF) >> mshift) - base + 1
            q = min(max(q, 0), half - 1)
            # branch-free sign: activations are ~50% negative, a branch mispredicts half the
            # time; q ^ -1 = -q - 1 maps bin q to its mirror half - 1 - q
            neg = -np.int64(v < 0)
            hist[j, half + (q ^ neg)] += 1
            if v >= vals[j, k - 1]:
                k32 = bits if bits >= 0 else bits ^ 0x7FFFFFFF
                if k32 == -1:  # -0.0 sorts as +0.0
                    k32 = 0
                key = (np.int64(k32) << 31) | rpos
                if key > keys[j, k - 1]:
                    i = k - 1
                    while i > 0 and keys[j, i - 1] < key:
                        keys[j, i] = keys[j, i - 1]
                        vals[j, i] = vals[j, i - 1]
                        i -= 1
                    keys[j, i] = key
                    vals[j, i] = v


if AVAILABLE:
    moments_update = numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)(
        _moments_update
    )
    hist_topk_update = numba.njit(cache=True, nogil=True, boundscheck=False)(_hist_topk_update)
else:  # pragma: no cover
    moments_update = hist_topk_update = None
