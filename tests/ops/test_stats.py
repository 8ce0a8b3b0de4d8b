"""Streaming statistics against float64 numpy over the full data; kernel vs torch reference."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from ops import kernels
from ops.stats import (
    NeuronAccumulator,
    bin_index,
    bin_index_np,
    finalize,
    hist_spec,
    merge_partials,
    pack_keys,
    unpack_keys,
)

BACKENDS = ["torch"] + (["numba"] if kernels.AVAILABLE else [])


def _data(t: int = 3000, d: int = 37, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(t, d)).astype(np.float32) * rng.uniform(0.01, 50, d).astype(
        np.float32
    )
    x += rng.uniform(-5, 5, d).astype(np.float32)  # |mean| >> std for some neurons
    x[:, 0] = 0.0  # dead neuron
    x[:, 1] = 2.5  # constant neuron
    x[::7, 2] = 1.0  # many exact ties
    x = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()  # as a bf16 model emits
    return x


def _reference(x: np.ndarray, positions: np.ndarray, k: int, edges: np.ndarray) -> dict:
    x64 = x.astype(np.float64)
    mean = x64.mean(0)
    c = x64 - mean
    var = (c**2).mean(0)
    safe = np.where(var > 0, var, 1.0)
    bins = bin_index_np(x, edges)
    hist = np.stack([np.bincount(bins[:, j], minlength=len(edges) - 1) for j in range(x.shape[1])])
    # canonical top-k: value descending, then smaller position first
    order = np.lexsort((positions[:, None].repeat(x.shape[1], 1), -x64), axis=0)[:k].T
    return {
        "mean": mean,
        "var": var,
        "skew": np.where(var > 0, (c**3).mean(0) / safe**1.5, 0.0),
        "kurt": np.where(var > 0, (c**4).mean(0) / safe**2, 0.0),
        "min": x.min(0),
        "max": x.max(0),
        "frac_active": (x > 0).mean(0),
        "hist": hist,
        "top_positions": positions[order],
        "top_values": np.take_along_axis(x, order.T, 0).T,
    }


def _run(x, positions, k, spec, backend, batch=256):
    acc = NeuronAccumulator(x.shape[1], k, spec, backend=backend)
    for i in range(0, len(x), batch):
        acc.update(torch.from_numpy(x[i : i + batch]), torch.from_numpy(positions[i : i + batch]))
    return acc.partial()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_matches_float64_numpy(backend: str) -> None:
    x = _data()
    positions = np.arange(len(x), dtype=np.int64) * 3 + 11
    spec = hist_spec(64, 1e-2, 1e3)
    k = 8
    ref = _reference(x, positions, k, spec.edges())
    part = _run(x, positions, k, spec, backend)
    got = finalize(part)
    assert part.n == len(x)
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got["var"], ref["var"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got["skew"], ref["skew"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["kurt"], ref["kurt"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got["min"], ref["min"])
    np.testing.assert_array_equal(got["max"], ref["max"])
    np.testing.assert_allclose(got["frac_active"], ref["frac_active"], rtol=0, atol=0)
    np.testing.assert_array_equal(got["hist"], ref["hist"])
    np.testing.assert_array_equal(part.top_values, ref["top_values"])
    np.testing.assert_array_equal(part.top_positions, ref["top_positions"])
    assert got["dead"][0] and not got["dead"][3]
    assert got["skew"][1] == 0.0 and got["kurt"][1] == 0.0  # constant: 0, not NaN
    assert not np.isnan(got["kurt"]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_merge_equals_one_pass(backend: str) -> None:
    x = _data(seed=1)
    positions = np.arange(len(x), dtype=np.int64)
    spec = hist_spec(32, 1e-2, 1e2)
    one = finalize(_run(x, positions, 5, spec, backend))
    cuts = [0, 100, 1500, 1501, 3000]
    parts = [_run(x[a:b], positions[a:b], 5, spec, backend) for a, b in pairwise(cuts)]
    merged_part = merge_partials(parts)
    merged = finalize(merged_part)
    for key, rtol in (("mean", 1e-9), ("var", 1e-7), ("skew", 1e-5), ("kurt", 1e-5)):
        np.testing.assert_allclose(merged[key], one[key], rtol=rtol, atol=1e-7)
    for key in ("min", "max", "hist", "count", "frac_active"):
        np.testing.assert_array_equal(merged[key], one[key])
    ref = _reference(x, positions, 5, spec.edges())
    np.testing.assert_array_equal(merged_part.top_positions, ref["top_positions"])


def test_numba_kernel_equals_torch_reference() -> None:
    if not kernels.AVAILABLE:
        pytest.skip("numba not installed")
    x = _data(seed=2, d=301)
    positions = np.arange(len(x), dtype=np.int64)
    spec = hist_spec(256)
    a = _run(x, positions, 16, spec, "numba", batch=333)
    b = _run(x, positions, 16, spec, "torch", batch=333)
    for name in ("hist", "n_pos", "vmin", "vmax", "top_values", "top_positions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    fa, fb = finalize(a), finalize(b)
    # the torch path forms powers in float32 (GPU-friendly); cancellation in Σc³ costs digits
    for key, rtol in (("mean", 1e-9), ("var", 1e-6), ("skew", 1e-4), ("kurt", 1e-5)):
        np.testing.assert_allclose(fa[key], fb[key], rtol=rtol, atol=1e-6, err_msg=key)


def test_fewer_tokens_than_k_leaves_empty_slots() -> None:
    x = _data(t=3, d=4)
    part = _run(x, np.arange(3, dtype=np.int64), 5, hist_spec(16, 0.1, 10), BACKENDS[-1])
    assert (part.top_positions[:, 3:] == -1).all()
    assert np.isnan(part.top_values[:, 3:]).all()
    assert (part.top_positions[:, :3] >= 0).all()


def test_histogram_bins_follow_stored_edges() -> None:
    spec = hist_spec(256)
    edges = spec.edges()
    assert edges.shape == (257,) and np.all(np.diff(edges) > 0) and edges[128] == 0
    probe = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(np.inf)),
                            np.nextafter(edges, np.float32(-np.inf)),
                            np.array([0.0, -0.0, 1e-30, 1e30, -1e30], np.float32)]).astype(np.float32)  # fmt: skip
    got = bin_index(torch.from_numpy(probe), spec).numpy()
    np.testing.assert_array_equal(got, bin_index_np(probe, edges))
    assert edges[129] <= 1e-3 and edges[-1] >= 1e4  # covers the configured range


def test_keys_round_trip_and_order() -> None:
    v = torch.tensor([1.5, -2.0, 0.0, -0.0, 1.5, 3e38, -3e38], dtype=torch.float32)
    p = torch.tensor([10, 3, 7, 8, 2, 0, 2**31 - 1])
    keys = pack_keys(v, p)
    vv, pp = unpack_keys(keys)
    np.testing.assert_array_equal(pp.numpy(), p.numpy())
    np.testing.assert_array_equal(vv.numpy(), np.abs(v.numpy()) * np.sign(v.numpy()) + 0.0)
    order = torch.argsort(keys, descending=True)
    assert p[order].tolist() == [0, 2, 10, 7, 8, 3, 2**31 - 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_update_rows_reads_only_selected_rows_in_place(dtype: torch.dtype) -> None:
    """The kernel's in-place bfloat16/float32 row reads equal the reference on the gathered rows."""
    if not kernels.AVAILABLE:
        pytest.skip("numba not installed")
    x = torch.from_numpy(_data(t=900, d=53, seed=3)).to(dtype)
    rows = torch.from_numpy(np.sort(np.random.default_rng(0).choice(900, 500, replace=False)))
    positions = rows * 7 + 1
    spec = hist_spec(64, 1e-2, 1e3)
    a = NeuronAccumulator(53, 9, spec, backend="numba")
    b = NeuronAccumulator(53, 9, spec, backend="torch")
    for lo in range(0, 500, 128):  # several batches
        sl = slice(lo, lo + 128)
        a.update_rows(x, rows[sl], positions[sl])
        b.update(x[rows[sl]], positions[sl])
    pa, pb = a.partial(), b.partial()
    for name in ("hist", "n_pos", "vmin", "vmax", "top_values", "top_positions"):
        np.testing.assert_array_equal(getattr(pa, name), getattr(pb, name), err_msg=name)
    ref = _reference(x[rows].float().numpy(), positions.numpy(), 9, spec.edges())
    np.testing.assert_allclose(finalize(pa)["var"], ref["var"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(pa.top_positions, ref["top_positions"])
