"""Streaming correlations against numpy.corrcoef in float64 on the full data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ops.correlation import CoMoments, FamilyMoments, match, merge_comoments
from ops.plan import PairTile


def _pair(t: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((t, 20)).astype(np.float32) * rng.uniform(0.1, 30, 20).astype(
        np.float32
    )
    a += rng.uniform(-50, 50, 20).astype(np.float32)  # |mean| >> std for some neurons
    b = np.concatenate([a[:, :8] * 0.5 + rng.standard_normal((t, 8)), rng.standard_normal((t, 7))],
                       axis=1).astype(np.float32)  # fmt: skip
    a[:, 3] = 7.0  # constant neuron
    b[:, 10] = 0.0  # dead neuron
    return a, b


def _accumulate(a: np.ndarray, b: np.ndarray, batch: int = 256, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> CoMoments:  # fmt: skip
    """``a`` and ``b`` as one-layer models through ``FamilyMoments`` (one pair tile)."""
    tile = PairTile(0, 1, 0, 1)
    acc = FamilyMoments([tile], {0: [0], 1: [0]}, {0: a.shape[1], 1: b.shape[1]}, device, dtype,
                        flush_tokens=512 if device == "cuda" else None)  # fmt: skip
    for i in range(0, len(a), batch):
        acc.update({(0, 0): torch.from_numpy(a[i : i + batch]).to(device),
                    (1, 0): torch.from_numpy(b[i : i + batch]).to(device)})  # fmt: skip
    return acc.pair_moments(tile)


def _corrcoef(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r = np.corrcoef(a.astype(np.float64), b.astype(np.float64), rowvar=False)[
        : a.shape[1], a.shape[1] :
    ]
    return np.nan_to_num(r, nan=0.0)  # numpy gives NaN for constant columns; we promise 0


def test_streaming_pearson_equals_corrcoef() -> None:
    a, b = _pair()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = _corrcoef(a, b)
    got = _accumulate(a, b).pearson()
    assert np.abs(got - ref).max() <= 1e-5
    assert not np.isnan(got).any()
    assert (got[3] == 0).all() and (got[:, 10] == 0).all()  # constant / dead: 0, not NaN


def test_merge_in_any_grouping_equals_one_pass() -> None:
    a, b = _pair(seed=1)
    one = _accumulate(a, b, batch=len(a))
    for cuts in ([0, 1, 999, 2000], [0, 500, 1000, 1500, 2000], [0, 1999, 2000]):
        parts = [
            _accumulate(a[x:y], b[x:y], batch=97) for x, y in zip(cuts, cuts[1:], strict=False)
        ]
        left = merge_comoments(parts)
        right = parts[-1]
        for p in reversed(parts[:-1]):
            right = p.merge(right)
        # the merge itself is float64: groupings of the same partials agree to rounding
        np.testing.assert_allclose(left.c, right.c, rtol=1e-12, atol=1e-9 * np.abs(left.c).max())
        np.testing.assert_allclose(left.m2_b, right.m2_b, rtol=1e-12)
        # against one pass, only the float32 batch products differ
        assert left.n == one.n
        np.testing.assert_allclose(left.mean_a, one.mean_a, rtol=1e-9, atol=1e-6)
        assert np.abs(left.pearson() - one.pearson()).max() <= 1e-6


def test_permuted_copy_matches_every_neuron_to_its_image() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3000, 40)).astype(np.float32) @ rng.standard_normal((40, 40)).astype(
        np.float32
    )
    perm = rng.permutation(40)
    b = a[:, perm]  # b[:, j] = a[:, perm[j]]
    r = _accumulate(a, b).pearson()
    inv = np.argsort(perm)
    np.testing.assert_array_equal(r.argmax(1), inv)
    m, corr = match(r)
    np.testing.assert_array_equal(m, inv)
    assert corr.min() > 1 - 1e-6


def test_reduced_precision_products_are_cuda_only() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        FamilyMoments([], {}, {}, "cpu", matmul_dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_accumulator_matches_corrcoef(dtype: torch.dtype) -> None:
    """On the device, float32 buffers folded into float64: r within 1e-5 (float32 inputs) or
    1e-3 (float16/bfloat16 inputs, tensor cores) of float64 numpy."""
    a, b = _pair(seed=4)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = _corrcoef(a, b)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    got = _accumulate(a, b, device="cuda", dtype=dtype).pearson()
    assert np.abs(got - ref).max() <= tol


def _operands(dim: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """``(c, aᵀ, b)`` as ``FamilyMoments`` passes them: float32 ``c``, a transposed view."""
    g = torch.Generator().manual_seed(dim)
    lead = (3,) if dim == 3 else ()
    a = torch.randn(*lead, 64, 24, generator=g).to(device, dtype)
    b = torch.randn(*lead, 64, 40, generator=g).to(device, dtype)
    c = torch.randn(*lead, 24, 40, generator=g).to(device)
    return c, a.transpose(-2, -1), b


@pytest.mark.parametrize("dim", [2, 3])
def test_in_place_accumulation_adds_or_declines_and_remembers(dim, monkeypatch) -> None:
    """``accumulate_in_place`` adds ``aᵀ·b`` into ``c`` in float32, or says it cannot and
    leaves ``c`` untouched; a kind it could not do is not tried again. This CPU has float32
    GEMMs with ``beta = 1`` and no reduced-precision ones with a float32 output."""
    import ops.correlation as corr

    monkeypatch.setattr(corr, "_IN_PLACE", {})
    c, at, b = _operands(dim, torch.float32, "cpu")
    want = c + at @ b
    assert corr.accumulate_in_place(c, at, b)
    torch.testing.assert_close(c, want)
    c, at, b = _operands(dim, torch.bfloat16, "cpu")
    before = c.clone()
    done = corr.accumulate_in_place(c, at, b)
    if done:  # a torch that has them: exact products, float32 sums
        torch.testing.assert_close(c, before + at.float() @ b.float(), rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(c, before) and corr._IN_PLACE[("cpu", dim, True)] is False
        monkeypatch.setattr(torch, "addmm", None)  # not tried again: would raise TypeError
        monkeypatch.setattr(torch, "baddbmm", None)
        assert not corr.accumulate_in_place(c, at, b) and torch.equal(c, before)


def test_in_place_accumulation_raises_real_errors_once_it_has_worked(monkeypatch) -> None:
    import ops.correlation as corr

    monkeypatch.setattr(corr, "_IN_PLACE", {("cpu", 2, False): True})
    c, at, b = _operands(2, torch.float32, "cpu")
    with pytest.raises(RuntimeError):
        corr.accumulate_in_place(c, at[:5], b)  # shapes that cannot multiply


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_in_place_accumulation_adds_or_declines(dtype, dim, monkeypatch) -> None:
    """On the device, this torch's ``addmm``/``baddbmm`` (with ``out_dtype`` and ``out=``
    for reduced precision) add the float32-accumulated product into ``c``, or decline and
    leave it untouched (then ``FamilyMoments`` adds a product instead)."""
    import ops.correlation as corr

    monkeypatch.setattr(corr, "_IN_PLACE", {})
    c, at, b = _operands(dim, dtype, "cuda")
    before = c.clone()
    done = corr.accumulate_in_place(c, at, b)
    print(f"in-place accumulation of {dtype} products into float32 ({dim}-d): {done}")
    if dtype == torch.float32:
        assert done
    if done:
        torch.testing.assert_close(c, before + at.float() @ b.float(), rtol=1e-4, atol=1e-3)
    else:
        assert torch.equal(c, before)
