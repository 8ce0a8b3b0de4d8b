"""ops.taxonomy: the Misra–Gries summaries against exact counts, the counters against a
float64 numpy computation over the same rows, and the scores against their definitions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ops.taxonomy import (
    BIGRAM_BASE,
    EMPTY,
    CountersAccumulator,
    Sketch,
    Thresholds,
    group_sums,
    labels,
    merge_counters,
    merge_sketches,
    position_buckets,
    reduce_events,
    scores,
    stack_counters,
)


def _sketch_of(units: np.ndarray, items: np.ndarray, d: int, m: int) -> Sketch:
    return reduce_events(d, m, units, items, np.ones(len(units), np.int64), np.zeros(d, np.int64))


def _as_dict(s: Sketch, u: int) -> dict[int, int]:
    return {int(i): int(c) for i, c in zip(s.items[u], s.counts[u], strict=True) if i != EMPTY}


def test_summary_is_exact_with_at_most_m_items_and_sorted() -> None:
    rng = np.random.default_rng(0)
    d, m = 5, 8
    units = rng.integers(0, d, 400)
    items = rng.integers(0, 7, 400)  # 7 distinct items < m
    s = _sketch_of(units, items, d, m)
    assert (s.err == 0).all()
    for u in range(d):
        assert _as_dict(s, u) == dict(Counter(items[units == u].tolist()))
        c = s.counts[u]
        assert (np.diff(c) <= 0).all()  # descending


def test_summary_bounds_hold_beyond_m_items_and_merging_keeps_them() -> None:
    rng = np.random.default_rng(1)
    d, m = 3, 6
    units = rng.integers(0, d, 3000)
    items = rng.zipf(1.6, 3000) % 50
    whole = Counter(zip(units.tolist(), items.tolist(), strict=True))
    # summarised in 5 pieces, then merged in order
    parts = [_sketch_of(units[a : a + 600], items[a : a + 600], d, m) for a in range(0, 3000, 600)]
    s = merge_sketches(parts)
    for u in range(d):
        est = _as_dict(s, u)
        for item in {i for (uu, i) in whole if uu == u}:
            true = whole[(u, item)]
            got = est.get(item, 0)
            assert true - s.err[u] <= got <= true, (u, item, true, got, s.err[u])
        # the heaviest item is kept (zipf: it is far above the error)
        top = max((c, -i) for (uu, i), c in whole.items() if uu == u)
        assert s.items[u, 0] == -top[1]
    assert (s.err > 0).all()


def test_merge_of_exact_summaries_is_exact_and_order_free() -> None:
    rng = np.random.default_rng(2)
    d, m = 4, 16
    units, items = rng.integers(0, d, 500), rng.integers(0, 10, 500)
    a = _sketch_of(units[:250], items[:250], d, m)
    b = _sketch_of(units[250:], items[250:], d, m)
    ab, ba, whole = merge_sketches([a, b]), merge_sketches([b, a]), _sketch_of(units, items, d, m)
    for s in (ab, ba):
        np.testing.assert_array_equal(s.items, whole.items)
        np.testing.assert_array_equal(s.counts, whole.counts)


def _reference(x, tokens, prev, bucket, source, thr, B, S):
    """Float64 numpy counts of one layer (the counters sum in float32 within a batch)."""
    fired = x.astype(np.float64) > thr
    out = {"tokens": len(tokens), "fires": fired.sum(0),
           "pos_fires": np.stack([fired[bucket == b].sum(0) for b in range(B)], 1),
           "src_fires": np.stack([fired[source == s].sum(0) for s in range(S)], 1),
           "src_sum": np.stack([x[source == s].astype(np.float64).sum(0) for s in range(S)], 1)}  # fmt: skip
    tok = [Counter(tokens[fired[:, j]].tolist()) for j in range(x.shape[1])]
    bi = [Counter(zip(prev[fired[:, j] & (prev >= 0)].tolist(), tokens[fired[:, j] & (prev >= 0)].tolist(),
                      strict=True)) for j in range(x.shape[1])]  # fmt: skip
    return out, tok, bi


def test_counters_equal_a_float64_computation_and_shards_merge_exactly() -> None:
    rng = np.random.default_rng(3)
    T, d, V, B, S, m = 900, 6, 12, 4, 3, 200
    x = rng.standard_normal((T, d)).astype(np.float32)
    tokens = rng.integers(0, V, T)
    prev = np.where(rng.random(T) < 0.1, -1, rng.integers(0, V, T))
    bucket = rng.integers(0, B, T)
    source = rng.integers(0, S, T).astype(np.int16)
    thr = 0.3
    # two "shards" of three batches each, merged in order
    parts = []
    for lo, hi in ((0, 450), (450, 900)):
        acc = CountersAccumulator(d, B, S, m, threshold=thr, flush_events=40)  # several folds
        for a in range(lo, hi, 150):
            sl = slice(a, a + 150)
            acc.update(torch.from_numpy(x[sl]), tokens[sl], prev[sl], bucket[sl], source[sl])
        parts.append(acc.partial())
    p = merge_counters(parts)
    ref, tok, bi = _reference(x, tokens, prev, bucket, source, thr, B, S)
    assert int(p.tokens) == ref["tokens"]
    np.testing.assert_array_equal(p.fires, ref["fires"])
    np.testing.assert_array_equal(p.pos_fires, ref["pos_fires"])
    np.testing.assert_array_equal(p.pos_tokens, np.bincount(bucket, minlength=B))
    x64 = x.astype(np.float64)
    for b in range(B):
        np.testing.assert_allclose(p.pos_sum[:, b], x64[bucket == b].sum(0), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(p.src_fires, ref["src_fires"])
    np.testing.assert_allclose(p.src_sum, ref["src_sum"], rtol=1e-6, atol=1e-5)
    for j in range(d):  # m is above the distinct items: exact
        assert _as_dict(p.sketch("tok"), j) == dict(tok[j])
        assert _as_dict(p.sketch("bi"), j) == {a * BIGRAM_BASE + b: c for (a, b), c in bi[j].items()}
    # stacked layers merge as the layers one by one
    st = merge_counters([stack_counters([q, q]) for q in parts])
    np.testing.assert_array_equal(st.tok_counts[1], p.tok_counts)
    np.testing.assert_array_equal(st.pos_fires[0], p.pos_fires)


def test_scores_follow_their_definitions() -> None:
    rng = np.random.default_rng(4)
    T, d, V, B, S = 2000, 4, 9, 5, 3
    x = rng.standard_normal((T, d)).astype(np.float32)
    tokens, bucket = rng.integers(0, V, T), rng.integers(0, B, T)
    source = rng.integers(0, S, T).astype(np.int16)
    acc = CountersAccumulator(d, B, S, 64, threshold=0.0)
    acc.update(torch.from_numpy(x), tokens, np.full(T, -1), bucket, source)
    sc = scores(acc.partial())
    fired = x.astype(np.float64) > 0
    for j in range(d):
        f = fired[:, j]
        c = np.array(sorted(Counter(tokens[f].tolist()).values(), reverse=True), float)
        assert sc["token_top1"][j] == pytest.approx(c[0] / f.sum())
        assert sc["token_top5"][j] == pytest.approx(c[:5].sum() / f.sum())
        assert sc["token_entropy"][j] == pytest.approx(-(c / c.sum() * np.log(c / c.sum())).sum())
        # mutual information from the joint of (bucket, fired)
        joint = np.array([[np.mean((bucket == b) & (f == v)) for v in (0, 1)] for b in range(B)])
        pb, pf = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        mi = np.nansum(joint * np.log(joint / (pb * pf)))
        assert sc["pos_mi"][j] == pytest.approx(mi, abs=1e-12)
        h_f = -(f.mean() * np.log(f.mean()) + (1 - f.mean()) * np.log(1 - f.mean()))
        assert sc["pos_nmi"][j] == pytest.approx(mi / h_f, abs=1e-12)
        # eta^2 of the firing indicator by bucket
        rates = np.array([f[bucket == b].mean() for b in range(B)])
        eta2 = sum((bucket == b).sum() * (rates[b] - f.mean()) ** 2 for b in range(B)) / (T * f.var())
        assert sc["pos_var"][j] == pytest.approx(eta2)
        a = x[:, j].astype(np.float64)
        means = np.array([a[bucket == b].mean() for b in range(B)])
        np.testing.assert_allclose(sc["pos_mean"][j], means, rtol=1e-6, atol=1e-7)
        rate = np.array([f[source == s].mean() for s in range(S)])
        q = rate / rate.sum()
        assert sc["source_selectivity"][j] == pytest.approx(1 + (q * np.log(q)).sum() / np.log(S))
        assert sc["source_favoured"][j] == rate.argmax()
        mean_s = [x[source == s, j].astype(np.float64).mean() for s in range(S)]
        np.testing.assert_allclose(sc["source_mean"][j], mean_s, rtol=1e-6, atol=1e-7)


def test_only_recorded_rows_count() -> None:
    """Given the whole batch view and the recorded rows, the rest (BOS, padding) is ignored."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    rows = np.sort(rng.choice(50, 30, replace=False))
    tok, b, s = rng.integers(0, 9, 30), rng.integers(0, 2, 30), rng.integers(0, 2, 30)
    whole = CountersAccumulator(5, 2, 2, 16)
    whole.update(torch.from_numpy(x), tok, np.full(30, -1), b, s, rows=rows)
    picked = CountersAccumulator(5, 2, 2, 16)
    picked.update(torch.from_numpy(x[rows]), tok, np.full(30, -1), b, s)
    p, q = whole.partial(), picked.partial()
    for name in ("fires", "pos_fires", "src_fires", "tok_items", "tok_counts"):
        np.testing.assert_array_equal(getattr(p, name), getattr(q, name))
    np.testing.assert_allclose(p.src_sum, q.src_sum, rtol=1e-6)


@pytest.mark.parametrize("capacity", [1 << 20, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numba_kernel_equals_the_torch_path(dtype, capacity, monkeypatch) -> None:
    """The fused CPU kernel (ops.kernels.fire_rows) against the torch (GPU) path, float32 and
    bfloat16 batches; buffers too small for the events included (the kernel's first one,
    and the device path's ``event_capacity``: events read again from the kept mask)."""
    from ops import kernels

    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((64, 40)).astype(np.float32)).to(dtype)
    rows = np.sort(rng.choice(64, 50, replace=False))
    tok, b, s = rng.integers(0, 30, 50), rng.integers(0, 3, 50), rng.integers(0, 2, 50)
    prev = rng.integers(-1, 30, 50)
    out = []
    for use_kernel in (True, False):
        monkeypatch.setattr(kernels, "AVAILABLE", use_kernel)
        acc = CountersAccumulator(40, 3, 2, 64, threshold=rng.random(40).astype(np.float32) * 0 + 0.2,
                                  event_capacity=capacity)  # fmt: skip
        for i in range(3):
            acc.update(x, tok[i:], prev[i:], b[i:], s[i:], rows=rows[i:])
            assert len(acc._inflight) <= 1  # the device path keeps at most one batch in flight
        out.append(acc.partial())
        assert not acc._inflight
    k, t = out
    for name in ("fires", "pos_fires", "src_fires", "tok_items", "tok_counts", "bi_items",
                 "bi_counts"):  # fmt: skip
        np.testing.assert_array_equal(getattr(k, name), getattr(t, name), err_msg=name)
    np.testing.assert_allclose(k.src_sum, t.src_sum, rtol=1e-6, atol=1e-5)
    assert k.fires.sum() > 64 * 40 // 16  # more events than the kernel's first buffer


def test_labels_pick_the_wired_neurons() -> None:
    """Neuron 0 fires only on token 3, neuron 1 only at late positions, neuron 2 only in
    source 1, neuron 3 never."""
    rng = np.random.default_rng(5)
    T, V, S, seq = 4000, 20, 3, 32
    tokens = rng.integers(0, V, T)
    pos = rng.integers(1, seq, T)
    bucket = position_buckets(seq, 8)[pos]
    source = rng.integers(0, S, T).astype(np.int16)
    x = np.full((T, 4), -1.0, np.float32)
    x[tokens == 3, 0] = 2.0
    x[pos >= 24, 1] = 1.0
    x[source == 1, 2] = 1.0
    acc = CountersAccumulator(4, 8, S, 16)
    acc.update(torch.from_numpy(x), tokens, np.full(T, -1), bucket, source)
    p = acc.partial()
    sc = scores(p)
    lab = labels(sc, dead=p.fires == 0, massive=np.zeros(4, bool), t=Thresholds(), fires=p.fires)
    assert lab["token"].tolist() == [True, False, False, False]
    assert lab["positional"].tolist() == [False, True, False, False]
    assert lab["source"].tolist() == [False, False, True, False]
    assert lab["dead"].tolist() == [False, False, False, True]
    assert p.tok_items[0, 0] == 3 and sc["token_top1"][0] == 1.0
    assert sc["source_favoured"][2] == 1


def test_group_sums_by_gemm_equal_index_add_and_repeat() -> None:
    """The GPU's group sums (a one-hot GEMM: a fixed order, no atomics) against the CPU's
    ``index_add_``: float32 sums of the same rows; and twice the same bits."""
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((3000, 70)).astype(np.float32) * 10)
    g = torch.from_numpy(rng.integers(0, 12, 3000))
    g[g == 5] = 4  # an empty group
    add = group_sums(x, g, 12, gemm=False)
    gemm = group_sums(x, g, 12, gemm=True)
    assert gemm.dtype == add.dtype == torch.float32 and gemm.shape == (12, 70)
    ref = np.stack([x.numpy()[g.numpy() == k].astype(np.float64).sum(0) for k in range(12)])
    np.testing.assert_allclose(gemm.numpy(), ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(gemm.numpy(), add.numpy(), rtol=1e-5, atol=1e-3)
    assert (gemm[5] == 0).all()
    assert torch.equal(group_sums(x, g, 12, gemm=True), gemm)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_counters_equal_the_numba_path_and_repeat_bit_for_bit(dtype) -> None:
    """The device path of ``CountersAccumulator`` (fire events by ``nonzero_static`` read a
    batch later, group sums by a one-hot GEMM) against the host's numba kernel over the same
    batches: equal counts and summaries, sums to float32 rounding; two device runs give the
    same bits (``index_add_``'s atomics did not)."""
    from ops import kernels

    if not kernels.AVAILABLE:
        pytest.skip("numba (the CPU path compared) missing")
    rng = np.random.default_rng(9)
    N, d, B, S, m = 6000, 384, 8, 3, 32
    x = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32)).to(dtype)
    rows = np.sort(rng.choice(N, 5000, replace=False))
    tok, prev = rng.integers(0, 500, 5000), rng.integers(-1, 500, 5000)
    b, s = rng.integers(0, B, 5000), rng.integers(0, S, 5000)
    thr = rng.uniform(0.5, 2.0, d).astype(np.float32)

    def run(device: str):
        acc = CountersAccumulator(d, B, S, m, threshold=thr, device=device, event_capacity=4096)
        xd = x.to(device)
        for lo in range(0, 5000, 1250):  # four batches; the first overflows the event buffer
            sl = slice(lo, lo + 1250)
            acc.update(xd, tok[sl], prev[sl], b[sl], s[sl], rows=rows[sl])
        return acc, acc.partial()

    host, want = run("cpu")
    assert host.grp_sum.device.type == "cpu"
    _, got = run("cuda")
    _, again = run("cuda")
    for name in ("fires", "pos_fires", "pos_tokens", "src_fires", "src_tokens", "tok_items",
                 "tok_counts", "tok_err", "bi_items", "bi_counts", "bi_err"):  # fmt: skip
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_allclose(got.pos_sum, want.pos_sum, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got.src_sum, want.src_sum, rtol=1e-5, atol=1e-3)
    for name in ("pos_sum", "src_sum", "tok_counts", "bi_counts"):
        np.testing.assert_array_equal(getattr(again, name), getattr(got, name), err_msg=name)
    assert got.fires.sum() > 4096  # the device path's buffer overflowed and was read again
