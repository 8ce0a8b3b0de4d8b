"""Fused CPU kernels for the per-batch statistics and taxonomy counters (numba).

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


def _row_moments(x, shift, s0, s1, s2, s3, vmin, vmax, npos):  # noqa: ANN001, ANN202
    """Shifted power sums, min, max and count of x > 0 of one token row (vectorises over d)."""
    for j in range(x.shape[0]):
        v = x[j]
        c = np.float64(v) - shift[j]
        c2 = c * c
        s0[j] += c
        s1[j] += c2
        s2[j] += c2 * c
        s3[j] += c2 * c2
        vmin[j] = min(vmin[j], v)
        vmax[j] = max(vmax[j], v)
        npos[j] += 1 if v > 0 else 0


def _row_bins(x, xi, half, base, mshift, out):  # noqa: ANN001, ANN202
    """Histogram bin of each value from its bit pattern (vectorises; see ops.stats.HistSpec)."""
    for j in range(x.shape[0]):
        q = ((xi[j] & 0x7FFFFFFF) >> mshift) - base + 1
        q = min(max(q, 0), half - 1)
        neg = -np.int64(x[j] < 0)  # q ^ -1 = -q - 1: bin q mirrored to half - 1 - q
        out[j] = half + (q ^ neg)


def _row_rest(x, xi, rpos, hist, bins, keys, vals):  # noqa: ANN001, ANN202
    """Histogram scatter, and streaming top-k by insertion (rarely past the float compare)."""
    d = x.shape[0]
    k = keys.shape[1]
    for j in range(d):
        hist[j, bins[j]] += 1
    for j in range(d):
        v = x[j]
        if v >= vals[j, k - 1]:
            bits = xi[j]
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


def _update_rows(act, wide, rows, positions, shift, s, vmin, vmax, npos, hist, half, base,
                 mshift, keys, vals, scratch, bins):  # noqa: ANN001, ANN202  # fmt: skip
    """Statistics of ``act[rows]`` (float32, or bfloat16 bits as int16) in one pass.

    Each row is widened to float32 into an L1-resident scratch row, so bfloat16
    activations are read once from the model's own buffer with no gather or cast copy.
    """
    xf = scratch.view(np.float32)
    xi = scratch.view(np.int32)
    pos_mask = np.int64(2**31 - 1)
    for r in range(rows.shape[0]):
        row = act[rows[r]]
        if wide:
            for j in range(row.shape[0]):
                xf[j] = row[j]
        else:
            for j in range(row.shape[0]):
                scratch[j] = (np.uint32(row[j]) & 0xFFFF) << 16
        _row_moments_jit(xf, shift, s[0], s[1], s[2], s[3], vmin, vmax, npos)
        _row_bins_jit(xf, xi, half, base, mshift, bins)
        _row_rest_jit(xf, xi, pos_mask - positions[r], hist, bins, keys, vals)


def _fire_rows(act, wide, rows, groups, thr, grp_sum, scratch, out):  # noqa: ANN001, ANN202
    """The taxonomy counters' dense pass over ``act[rows]`` (float32, or bfloat16 bits as
    int16): add each row into its group's sums (float64) and write ``r * d + j`` into
    ``out`` for every value above its neuron's threshold. Returns how many there were;
    more than ``out`` holds means only the first ``len(out)`` were written."""
    xf = scratch.view(np.float32)
    d = thr.shape[0]
    cap = out.shape[0]
    k = 0
    for r in range(rows.shape[0]):
        row = act[rows[r]]
        if wide:
            for j in range(d):
                xf[j] = row[j]
        else:
            for j in range(d):
                scratch[j] = (np.uint32(row[j]) & 0xFFFF) << 16
        g = groups[r]
        for j in range(d):
            v = xf[j]
            grp_sum[g, j] += v
            if v > thr[j]:
                if k < cap:
                    out[k] = r * d + j
                k += 1
    return k


if AVAILABLE:
    fire_rows = numba.njit(nogil=True, boundscheck=False, cache=True)(_fire_rows)
    _row_moments_jit = numba.njit(nogil=True, boundscheck=False, fastmath=True, cache=True)(
        _row_moments
    )
    _row_bins_jit = numba.njit(nogil=True, boundscheck=False, cache=True)(_row_bins)
    _row_rest_jit = numba.njit(nogil=True, boundscheck=False, cache=True)(_row_rest)
    update_rows = numba.njit(nogil=True, boundscheck=False, cache=True)(_update_rows)
else:  # pragma: no cover
    update_rows = None
    fire_rows = None
