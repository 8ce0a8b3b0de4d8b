"""The fused GPU statistics (``ops.fused``) against the float64 reference and the numba path.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``) on small shapes and small tiles, so that every edge
of the tiling (several row chunks, a partial last chunk, a partial column block, rows
left out, empty top-k slots, the candidate rounds) is exercised. With CUDA the compiled
kernels run at the default tiling on a bigger shape.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from ops import kernels
from ops.fused import Tiling
from ops.stats import NeuronAccumulator, finalize, hist_spec
from tests.ops.test_stats import _data, _reference

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed")  # fmt: skip
# only the comparisons with the CPU path need numba: the CUDA-only checks run without it
needs_numba = pytest.mark.skipif(not kernels.AVAILABLE,
                                 reason="numba (the CPU path compared) missing")  # fmt: skip


def test_kernels_run_in_the_interpreter_without_cuda() -> None:
    """tests/conftest.py sets TRITON_INTERPRET before triton.language can be imported."""
    assert CUDA or os.environ.get("TRITON_INTERPRET") == "1"


DEVICE = "cuda" if CUDA else "cpu"
SMALL = Tiling(chunk=16, sub=8, block=16, warps=1)
EXACT = ("hist", "n_pos", "vmin", "vmax", "top_values", "top_positions")


def _both(x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, k: int, spec,
          cuts: list[int], tiling: Tiling):  # noqa: ANN001  # fmt: skip
    """The numba partial (host) and the fused partial (DEVICE) over the same batches."""
    d = x.shape[1]
    a = NeuronAccumulator(d, k, spec, backend="numba")
    b = NeuronAccumulator(d, k, spec, DEVICE, backend="triton", tiling=tiling)
    xd, rd, pd = x.to(DEVICE), rows.to(DEVICE), positions.to(DEVICE)
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        a.update_rows(x, rows[lo:hi], positions[lo:hi])
        b.update_rows(xd, rd[lo:hi], pd[lo:hi])
    return a.partial(), b.partial()


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_equals_numba_and_float64(dtype: torch.dtype) -> None:
    t, d, k = (160, 37, 5) if not CUDA else (20000, 301, 32)
    x = torch.from_numpy(_data(t=t, d=d, seed=4)).to(dtype)
    rows = torch.from_numpy(np.flatnonzero(np.arange(t) % 5 != 1))  # some rows left out
    positions = rows * 3 + 7
    cuts = [0, 2, 70, len(rows)] if not CUDA else [0, 10, 9000, len(rows)]
    spec = hist_spec(64, 1e-2, 1e3)
    pa, pb = _both(x, rows, positions, k, spec, cuts, SMALL if not CUDA else Tiling())
    for name in EXACT:
        np.testing.assert_array_equal(getattr(pb, name), getattr(pa, name), err_msg=name)
    assert pb.n == pa.n == len(rows)
    ref = _reference(x[rows].float().numpy(), positions.numpy(), k, spec.edges())
    got = finalize(pb)
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got["var"], ref["var"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got["skew"], ref["skew"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["kurt"], ref["kurt"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(pb.top_positions, ref["top_positions"])  # ties by position
    assert got["skew"][1] == 0.0 and got["kurt"][1] == 0.0  # the constant neuron


@needs_numba
def test_fewer_rows_than_k_and_one_row_batches() -> None:
    x = torch.from_numpy(_data(t=6, d=20, seed=5)).to(torch.bfloat16)
    rows = torch.arange(6)
    positions = rows + 100
    spec = hist_spec(16, 0.1, 10)
    pa, pb = _both(x, rows, positions, 8, spec, [0, 1, 2, 6], SMALL)
    for name in EXACT:
        np.testing.assert_array_equal(getattr(pb, name), getattr(pa, name), err_msg=name)
    assert (pb.top_positions[:, 6:] == -1).all() and np.isnan(pb.top_values[:, 6:]).all()
    np.testing.assert_allclose(finalize(pb)["var"], finalize(pa)["var"], rtol=1e-9, atol=1e-12)


@needs_numba
def test_candidates_after_the_state_is_full() -> None:
    """Later batches that beat the running k-th (a rising neuron) and ties at it (same value,
    later position: never taken)."""
    t, d, k = 96, 18, 4
    x = np.zeros((t, d), np.float32)
    x[:, 0] = np.arange(t)  # every batch beats the whole state
    x[:, 1] = 1.0  # all ties: the first k positions stay
    x[:, 2] = np.where(np.arange(t) % 11 == 0, 5.0, -1.0)  # rare hits, spread out
    x[:, 3:] = np.random.default_rng(6).normal(size=(t, d - 3))
    rows = torch.arange(t)
    pa, pb = _both(torch.from_numpy(x), rows, rows * 2, k, hist_spec(16, 0.1, 10),
                   [0, 30, 31, 64, 96], SMALL)  # fmt: skip
    for name in EXACT:
        np.testing.assert_array_equal(getattr(pb, name), getattr(pa, name), err_msg=name)
    assert pb.top_positions[1].tolist() == [0, 2, 4, 6]
    assert pb.top_values[0].tolist() == [95.0, 94.0, 93.0, 92.0]


def test_the_update_does_not_wait_for_the_device() -> None:
    """No host sync in the per-batch path: the update only enqueues work (CUDA only)."""
    if not CUDA:
        pytest.skip("needs CUDA")
    x = torch.randn(16384, 1536, device="cuda", dtype=torch.bfloat16)
    rows = torch.arange(16384, device="cuda")
    acc = NeuronAccumulator(1536, 32, hist_spec(256), "cuda", backend="triton")
    acc.update_rows(x, rows, rows)  # compile, fill the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            acc.update_rows(x, rows, rows + 16384)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert acc.n == 4 * 16384


COMPILE = """
import json, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ops import _fused_kernels as k
from ops.fused import Tiling
t = Tiling()
stats = {"act": "*bf16", "stride": "i32", "rows": "*i64", "pos": "*i64", "n_rows": "i32",
         "d": "i32", "shift": "*fp64", "psum": "*fp64", "pmin": "*fp32", "pmax": "*fp32",
         "pnpos": "*i32", "hist": "*i32", "half": "i32", "base": "i32", "mshift": "i32",
         "state": "*i64", "cand": "*i64", "n_chunks": "i32", "BINS": "constexpr",
         "K": "constexpr", "CHUNK": "constexpr", "SUB": "constexpr", "BLOCK": "constexpr"}
finish = {"psum": "*fp64", "pmin": "*fp32", "pmax": "*fp32", "pnpos": "*i32", "n_chunks": "i32",
          "d": "i32", "shift": "*fp64", "na": "i64", "nb": "i32", "mean": "*fp64", "m2": "*fp64",
          "m3": "*fp64", "m4": "*fp64", "vmin": "*fp32", "vmax": "*fp32", "npos": "*i64",
          "BLOCK": "constexpr"}
consts = {"BINS": 256, "K": 32, "CHUNK": t.chunk, "SUB": t.sub, "BLOCK": t.block}
out = {}
for name, fn, sig, c in (("stats", k.stats_kernel, stats, consts),
                         ("finish", k.finish_kernel, finish, {"BLOCK": t.block})):
    kern = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": t.warps})
    open(name + ".ptx", "w").write(kern.asm["ptx"])
    out[name] = subprocess.run([sys.argv[1], "-arch=sm_90a", "-v", name + ".ptx", "-o",
                                name + ".cubin"], capture_output=True, text=True).stderr
print(json.dumps(out))
"""


def test_kernels_compile_for_hopper_without_spills(tmp_path) -> None:
    """Without a GPU, the kernels still go through Triton's real compiler to sm_90 machine
    code (ptxas ships with Triton): what the interpreter cannot check (types, loop-carried
    values, register pressure) is checked here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this Triton build has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", COMPILE, str(ptxas)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("stats", "finish"):
        info = report[name]
        assert "0 bytes spill stores, 0 bytes spill loads" in info, info
        regs = int(info.split("Used ")[1].split(" registers")[0])
        assert regs <= 128, f"{name}: {regs} registers a thread"
