"""The Triton kernels of :mod:`ops.fused` (imported on first use: Triton reads
``TRITON_INTERPRET`` when a kernel is defined, and ``ops`` must import without Triton)."""

# ruff: noqa: ANN001, ANN201, N803

import triton
import triton.language as tl

#: ``ops.stats.EMPTY_KEY`` and the position mask of ``ops.stats.pack_keys``, as kernel constants.
EMPTY = tl.constexpr(-(2**63))
POS_MASK = tl.constexpr(2**31 - 1)


@triton.jit
def key_of(x, p, m):
    """``p``: positions ``[rows, 1]``. ops.stats.pack_keys in the kernel: monotone float bits << 31 | reversed position;
    masked lanes and NaN get the empty key (NaN never enters the top-k on any path)."""
    bits = x.to(tl.int32, bitcast=True)
    k32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    k32 = tl.where(k32 == -1, 0, k32)
    key = (k32.to(tl.int64) << 31) | (POS_MASK - p.to(tl.int64))
    return tl.where(m & (x == x), key, EMPTY)


@triton.jit
def load_tile(act, stride, rows, pos, start, n_rows, cols, cmask, SUB: tl.constexpr):
    """Batch rows ``start .. start + SUB`` (gathered by row index, no copy of the batch) as
    float32 ``[SUB, BLOCK]``, their mask, and their positions ``[SUB, 1]``."""
    t = start + tl.arange(0, SUB)
    tmask = t < n_rows
    m = tmask[:, None] & cmask[None, :]
    row = tl.load(rows + t, mask=tmask, other=0)
    x = tl.load(act + row[:, None] * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return x, m, tl.load(pos + t, mask=tmask, other=0)[:, None]


@triton.jit
def stats_kernel(
    act, stride, rows, pos, n_rows, d, shift,
    psum, pmin, pmax, pnpos,
    hist, half, base, mshift,
    state, cand, n_chunks,
    BINS: tl.constexpr, K: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < d
    sh = tl.load(shift + cols, mask=cmask, other=0.0)
    kth = tl.load(state + cols.to(tl.int64) * K + (K - 1), mask=cmask, other=EMPTY)
    s1 = tl.zeros([BLOCK], tl.float64)
    s2 = tl.zeros([BLOCK], tl.float64)
    s3 = tl.zeros([BLOCK], tl.float64)
    s4 = tl.zeros([BLOCK], tl.float64)
    vmin = tl.full([BLOCK], float("inf"), tl.float32)
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    npos = tl.zeros([BLOCK], tl.int32)
    ncand = tl.zeros([BLOCK], tl.int32)
    for s in range(0, CHUNK, SUB):
        x, m, p = load_tile(act, stride, rows, pos, r * CHUNK + s, n_rows, cols, cmask, SUB)
        c = tl.where(m, x.to(tl.float64) - sh[None, :], 0.0)
        c2 = c * c
        s1 += tl.sum(c, 0)
        s2 += tl.sum(c2, 0)
        s3 += tl.sum(c2 * c, 0)
        s4 += tl.sum(c2 * c2, 0)
        vmin = tl.minimum(vmin, tl.min(tl.where(m, x, float("inf")), 0))
        vmax = tl.maximum(vmax, tl.max(tl.where(m, x, float("-inf")), 0))
        npos += tl.sum((m & (x > 0)).to(tl.int32), 0)
        # histogram bin from the float32 bit pattern (ops.stats.HistSpec)
        bits = x.to(tl.int32, bitcast=True)
        q = ((bits & 0x7FFFFFFF) >> mshift) - base + 1
        q = tl.minimum(tl.maximum(q, 0), half - 1)
        b = tl.where(x < 0, half - 1 - q, half + q)
        tl.atomic_add(hist + cols[None, :].to(tl.int64) * BINS + b, 1, mask=m, sem="relaxed")
        key = key_of(x, p, m)
        ncand += tl.sum((key > kth[None, :]).to(tl.int32), 0)
    # the chunk's candidates, largest first: one round per slot while any neuron has more
    most = tl.max(ncand, 0)
    prev = tl.full([BLOCK], 2**63 - 1, tl.int64)
    out = cand + cols.to(tl.int64) * (n_chunks * K) + r * K
    for i in range(K):
        best = tl.full([BLOCK], EMPTY, tl.int64)
        if i < most:
            for s in range(0, CHUNK, SUB):
                x, m, p = load_tile(act, stride, rows, pos, r * CHUNK + s, n_rows, cols, cmask,
                                    SUB)  # fmt: skip
                key = key_of(x, p, m)
                ok = (key > kth[None, :]) & (key < prev[None, :])
                best = tl.maximum(best, tl.max(tl.where(ok, key, EMPTY), 0))
        tl.store(out + i, best, mask=cmask)
        prev = best
    base_out = r * d + cols
    tl.store(psum + base_out, s1, mask=cmask)
    tl.store(psum + n_chunks * d + base_out, s2, mask=cmask)
    tl.store(psum + 2 * n_chunks * d + base_out, s3, mask=cmask)
    tl.store(psum + 3 * n_chunks * d + base_out, s4, mask=cmask)
    tl.store(pmin + base_out, vmin, mask=cmask)
    tl.store(pmax + base_out, vmax, mask=cmask)
    tl.store(pnpos + base_out, npos, mask=cmask)


@triton.jit(do_not_specialize=["na", "nb"])
def finish_kernel(
    psum, pmin, pmax, pnpos, n_chunks, d, shift, na, nb,
    mean, m2, m3, m4, vmin, vmax, npos, BLOCK: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < d
    s1 = tl.zeros([BLOCK], tl.float64)
    s2 = tl.zeros([BLOCK], tl.float64)
    s3 = tl.zeros([BLOCK], tl.float64)
    s4 = tl.zeros([BLOCK], tl.float64)
    lo = tl.load(vmin + cols, mask=cmask, other=0.0)
    hi = tl.load(vmax + cols, mask=cmask, other=0.0)
    cnt = tl.zeros([BLOCK], tl.int64)
    r = tl.program_id(0) * 0  # an int32 scalar tensor (the loop carries it)
    while r < n_chunks:  # (not range(n_chunks): Triton 3.6's interpreter rejects that)
        o = r * d + cols
        s1 += tl.load(psum + o, mask=cmask, other=0.0)
        s2 += tl.load(psum + n_chunks * d + o, mask=cmask, other=0.0)
        s3 += tl.load(psum + 2 * n_chunks * d + o, mask=cmask, other=0.0)
        s4 += tl.load(psum + 3 * n_chunks * d + o, mask=cmask, other=0.0)
        lo = tl.minimum(lo, tl.load(pmin + o, mask=cmask, other=0.0))
        hi = tl.maximum(hi, tl.load(pmax + o, mask=cmask, other=0.0))
        cnt += tl.load(pnpos + o, mask=cmask, other=0).to(tl.int64)
        r += 1
    tl.store(vmin + cols, lo, mask=cmask)
    tl.store(vmax + cols, hi, mask=cmask)
    tl.store(npos + cols, tl.load(npos + cols, mask=cmask, other=0) + cnt, mask=cmask)
    # batch mean and centred sums from the shifted sums (ops.stats._centred_from_shifted)
    fb = nb.to(tl.float64)
    delta = s1 / fb
    d2 = delta * delta
    b2 = tl.maximum(s2 - fb * d2, 0.0)
    b3 = s3 - 3.0 * delta * s2 + 2.0 * fb * d2 * delta
    b4 = tl.maximum(s4 - 4.0 * delta * s3 + 6.0 * d2 * s2 - 3.0 * fb * d2 * d2, 0.0)
    mb = tl.load(shift + cols, mask=cmask, other=0.0) + delta
    # Pébay's pairwise merge with the running state (ops.stats._moments_merge)
    fa = na.to(tl.float64)
    ma = tl.load(mean + cols, mask=cmask, other=0.0)
    a2 = tl.load(m2 + cols, mask=cmask, other=0.0)
    a3 = tl.load(m3 + cols, mask=cmask, other=0.0)
    a4 = tl.load(m4 + cols, mask=cmask, other=0.0)
    n = fa + fb
    dl = mb - ma
    d_n = dl / n
    d_n2 = d_n * d_n
    new_mean = ma + d_n * fb
    new2 = a2 + b2 + dl * d_n * fa * fb
    new3 = a3 + b3 + dl * d_n2 * fa * fb * (fa - fb) + 3.0 * d_n * (fa * b2 - fb * a2)
    new4 = (a4 + b4 + dl * d_n2 * d_n * fa * fb * (fa * fa - fa * fb + fb * fb)
            + 6.0 * d_n2 * (fa * fa * b2 + fb * fb * a2) + 4.0 * d_n * (fa * b3 - fb * a3))  # fmt: skip
    tl.store(mean + cols, new_mean, mask=cmask)
    tl.store(m2 + cols, new2, mask=cmask)
    tl.store(m3 + cols, new3, mask=cmask)
    tl.store(m4 + cols, new4, mask=cmask)
