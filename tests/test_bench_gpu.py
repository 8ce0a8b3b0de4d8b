"""Smoke test of ``bench/gpu.py`` (issue #9's GPU benchmark) on CPU with tiny shapes: it runs,
its figures agree with each other, and it imports nothing a bare GPU machine lacks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.sae import ARCHITECTURES
from tests.test_layering import imported_roots

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
FORBIDDEN = {"ray", "prefect", "zarr", "dask", "flows", "storage"}
SHAPES = {"smollm2-135m", "gpt2-small", "llama-3.2-1b"}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope="module")
def run() -> tuple[dict, str]:
    """The JSON figures of one small CPU run, and its ``-X importtime`` log (every module it
    imported, ``ops``' own imports included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--device", "cpu",
                           "--small", "--json", "--rounds", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout), proc.stderr


def test_record_figures(run: tuple[dict, str]) -> None:
    rec = run[0]["record"]
    assert set(rec["shapes"]) == SHAPES
    assert rec["tokens_per_round"] == rec["batch"] * rec["seq"] * rec["batches_per_round"]
    for s in rec["shapes"].values():
        assert (s["layers"], s["d_mlp"]) == (2, 128)
        tps = {k: s[f"{k}_tok_s"] for k in ("bare", "trunk", "record")}
        assert all(v > 0 and math.isfinite(v) for v in tps.values()), tps
        assert close(s["record_over_bare"], tps["record"] / tps["bare"])
        assert close(s["trunk_over_bare"], tps["trunk"] / tps["bare"])
        assert close(s["record_over_trunk"], tps["record"] / tps["trunk"])
        assert s["stats_backend"] == "numba"  # the CPU recording path


def test_sae_figures(run: tuple[dict, str]) -> None:
    sae = run[0]["sae"]
    assert sae["architectures"] == list(ARCHITECTURES)
    assert list(sae["runs"]) == ["fp32"]  # bf16 autocast is a CUDA-only row
    rows = sae["runs"]["fp32"]
    assert set(rows) == set(ARCHITECTURES) | {"gemm"}
    b, d, n, k = sae["batch"], sae["d_in"], sae["n_latents"], sae["k"]
    assert n == 16 * d
    assert rows["gemm"]["flops_per_step"] == 2 * b * d * n
    for arch in ARCHITECTURES:
        r = rows[arch]
        assert r["tok_s"] > 0 and r["tflops"] > 0
        # TFLOP/s and tok/s come from the same time: FLOPs per token = FLOPs per step / batch
        assert close(r["tflops"] * 1e12 / r["tok_s"], r["flops_per_step"] / b)
        assert close(r["over_gemm"], r["tflops"] / rows["gemm"]["tflops"])
        sparse = arch in ("topk", "batchtopk")  # they decode by gathering k rows
        assert r["flops_per_step"] == 6 * b * d * n + 6 * b * d * (k if sparse else n)


def test_comoment_figures(run: tuple[dict, str]) -> None:
    co = run[0]["comoments"]
    assert co["dtype"] == "torch.float32"  # reduced-precision products are CUDA-only
    assert co["update_tok_s"] > 0 and co["gemm_tok_s"] > 0
    assert close(co["update_over_gemm"], co["update_tok_s"] / co["gemm_tok_s"])
    assert close(co["update_over_gemm"], co["gemm_s"] / co["update_s"])


def test_runs_on_a_bare_gpu_machine(run: tuple[dict, str]) -> None:
    """No Ray, Prefect, Zarr, dask, flows or storage: neither in the source of the script and
    the bench modules it uses, nor among the modules the run imported."""
    for f in (SCRIPT, ROOT / "bench" / "universality.py"):
        assert imported_roots(f) & FORBIDDEN == set(), f
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in run[1].splitlines() if line.startswith("import time:")}  # fmt: skip
    assert "ops" in imported and "torch" in imported  # the log is what we think it is
    assert imported & FORBIDDEN == set()


def test_tables_print(run: tuple[dict, str], monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The readable tables render the run's figures (the script's own printing functions)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repo root
    for var in ("HF_HUB_OFFLINE", "TQDM_DISABLE"):  # and sets these if unset
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu)  # its dataclass looks itself up there
    spec.loader.exec_module(gpu)
    out = run[0]
    gpu.print_record(out["record"], "cpu", 2)
    gpu.print_sae(out["sae"], "cpu", 2)
    gpu.print_comoments(out["comoments"], "cpu", 2)
    text = capsys.readouterr().out
    for word in [*SHAPES, *ARCHITECTURES, "record÷bare", "update÷GEMM"]:
        assert word in text
    ratio = out["record"]["shapes"]["gpt2-small"]["record_over_bare"]
    assert f"{ratio:.3f}" in text
