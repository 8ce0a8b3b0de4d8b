"""The GPU benchmark run (``bench/gpu_check.sh`` and what it runs) on CPU: ``bench/gpu.py``
with tiny shapes runs and its figures agree with each other; nothing the GPU machine lacks is
imported (by the run, and by every module the script's steps import); a step that crashes
or hangs loses only itself; the closing summary reports tests and figures against goals.
``make gpu-env-check`` runs the whole script in a venv holding only the GPU machine's
packages."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ops.sae import ARCHITECTURES
from tests.test_layering import imported_roots

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
CHECK = ROOT / "bench" / "gpu_check.sh"
FORBIDDEN = {"ray", "prefect", "zarr", "dask", "flows", "storage"}
SHAPES = {"smollm2-135m", "gpt2-small", "llama-3.2-1b"}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """The JSON figures of one small CPU run, and its ``-X importtime`` log (every module it
    imported, ``ops``' own imports included). The same run writes ``--out``: it must hold
    the same figures."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path_factory.mktemp("gpu") / "all.json"
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--device", "cpu",
                           "--small", "--json", "--rounds", "2", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == figures
    assert [p.name for p in out.parent.iterdir()] == ["all.json"]  # no temporary left
    return figures, proc.stderr


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


# ---------------------------------------------------------------------------- the script


def script_tests() -> list[str]:
    """The test files ``bench/gpu_check.sh`` runs on the GPU machine."""
    m = re.search(r'^TESTS="(.*?)"', CHECK.read_text(), re.S | re.M)
    assert m, "gpu_check.sh lists its tests in TESTS=..."
    return m.group(1).split()


def script_limits() -> dict[str, int]:
    """The default step limits, ``T_NAME=${T_NAME:-seconds}``."""
    return {k: int(v) for k, v in re.findall(r"T_(\w+)=\$\{T_\w+:-(\d+)\}", CHECK.read_text())}


def test_the_script_fits_the_machine() -> None:
    """python3 (the machine has no ``python``), unbuffered output, limits that leave time
    within a 10-minute command even if every step runs out (with the grace before a kill),
    at most 8 files in $OUT, every listed test file present."""
    text = CHECK.read_text()
    assert 'PY=${PYTHON:-python3}' in text and not re.search(r"^\s*python\s", text, re.M)
    assert "export PYTHONUNBUFFERED=1" in text
    limits = script_limits()
    assert set(limits) == {"ENV", "PYTEST", "RECORD", "SAE", "COMOMENTS", "UNIVERSALITY",
                           "SUMMARY"}  # fmt: skip
    graces = {int(g) for g in re.findall(r"timeout -k (\d+)", text)}
    assert len(re.findall(r"timeout ", text)) == len(re.findall(r"timeout -k \d+ ", text)) + 1
    smi = int(re.search(r"timeout (\d+) nvidia-smi", text).group(1))  # the one without -k
    assert sum(limits.values()) + max(graces) * len(limits) + smi <= 480, limits
    files = re.search(r'^FILES="(.*?)"', text, re.M).group(1).split()
    assert len(files) <= 8 and "summary.txt" in files and "pytest.txt" in files
    for section in ("record", "sae", "comoments", "universality"):
        assert f"{section}.json" in files
        assert f'--out "$OUT/{section}.json"' in text  # one JSON per section, from its process
    for t in script_tests():
        assert (ROOT / t).is_file(), t


# the GPU machine's packages (../shared/ENV.md), and what transformers itself brings
GPU_MACHINE = {"torch", "transformers", "numpy", "scipy", "numba", "triton", "pytest", "_pytest",
               "tqdm", "huggingface_hub", "tokenizers", "safetensors"}  # fmt: skip
PROJECT = {"ops", "bench", "tests"}
# imports inside functions that the GPU run never calls: (file, imported module prefix)
LAZY_ELSEWHERE = {
    ("tests/conftest.py", "ray"): "the Ray cluster fixture of the flow tests",
    ("tests/conftest.py", "prefect"): "the Prefect harness fixture of the flow tests",
    ("tests/conftest.py", "tests.flows"): "the tiny jobs' atlases of the flow tests",
    ("ops/plan.py", "psutil"): "default_budget on CPUs: the flows' driver",
    ("ops/corpus.py", "pyarrow"): "parquet corpora of a job",
    ("ops/corpus.py", "datasets"): "hub corpora of a job",
}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, inside a function)`` for every import of a file; ``from a import b`` gives
    ``a`` and ``a.b`` (``b`` may be a module)."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module, inner))
                out.extend((f"{child.module}.{a.name}", inner) for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def gpu_run_imports() -> dict[str, set[str]]:
    """Every module outside the project that the GPU run's code imports, with the files that
    import it: from the bench scripts and the listed tests (and their conftest), through
    every project module they reach, module-level and function-level imports alike (a
    function's import runs when it is called), less :data:`LAZY_ELSEWHERE`."""
    start = ["bench/gpu.py", "bench/universality.py", "bench/gpu_summary.py", "bench/common.py",
             "tests/conftest.py", *script_tests()]  # fmt: skip
    todo = [ROOT / f for f in start]
    seen: set[Path] = set()
    outside: dict[str, set[str]] = {}
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        rel = str(f.relative_to(ROOT))
        for module, lazy in _imports(f):
            if lazy and any(module == m or module.startswith(m + ".")
                            for (src, m) in LAZY_ELSEWHERE if src == rel):  # fmt: skip
                continue
            root = module.split(".")[0]
            if root in PROJECT:
                parts = module.split(".")
                for i in range(1, len(parts) + 1):  # the package inits on the way count too
                    if (mf := _module_file(".".join(parts[:i]))) is not None:
                        todo.append(mf)
            elif root not in sys.stdlib_module_names:
                outside.setdefault(root, set()).add(rel)
    return outside


def test_the_gpu_run_imports_only_what_the_gpu_machine_has() -> None:
    """The import walk of what ``bench/gpu_check.sh`` runs (the CPU-side equivalent of
    ``make gpu-env-check``): only torch, transformers (and what it brings), numpy, scipy,
    numba, triton, pytest, the standard library and the project's ``ops``, ``bench`` and
    ``tests`` (no ``flows``, ``storage``: they import Ray, Prefect, Zarr)."""
    outside = gpu_run_imports()
    assert {"torch", "transformers", "numpy", "scipy", "numba", "triton", "pytest"} <= set(outside)
    assert {m: sorted(f) for m, f in outside.items() if m not in GPU_MACHINE} == {}


def test_the_import_walk_catches_a_forbidden_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk follows project imports into their modules, function-level ones included."""
    real = _imports

    def planted(path: Path) -> list[tuple[str, bool]]:
        extra = [("zarr", True)] if path.name == "universality.py" and path.parent.name == "ops" else []
        return real(path) + extra

    monkeypatch.setitem(globals(), "_imports", planted)
    assert gpu_run_imports()["zarr"] == {"ops/universality.py"}


def test_the_fused_tests_skip_only_what_needs_numba() -> None:
    """Without numba, ``test_fused.py`` skips its comparisons with the numba path only: its
    CUDA checks still run (here, without CUDA, what does not need a GPU passes)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None  # as if not installed
        import pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rs", "-o", "addopts=",
                              "tests/ops/test_fused.py"]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    skipped = re.findall(r"SKIPPED \[(\d+)\] \S+: (.*)", proc.stdout)
    numba = sum(int(n) for n, why in skipped if "numba" in why)
    assert numba == 4, proc.stdout[-2000:]  # two dtypes + two edge-case tests
    assert re.search(r"\b2 passed", proc.stdout), proc.stdout[-2000:]  # interpreter + ptxas


# ---------------------------------------------------------------------------- failures


STUB = textwrap.dedent('''
    """Stands in for python3 in bench/gpu_check.sh: each step misbehaves in its own way."""
    import json, os, subprocess, sys, time
    args = sys.argv[1:]
    real = os.environ["REAL_PYTHON"]
    if args[:1] == ["-"] or args[0].endswith("gpu_summary.py"):
        sys.exit(subprocess.run([real, *args]).returncode)  # env probe, summary: the real ones
    if args[:2] == ["-m", "pytest"]:
        print("tests/ops/test_a.py::test_ok PASSED [ 33%]")
        print("tests/ops/test_a.py::test_bad FAILED [ 66%]")
        print("tests/ops/test_a.py::test_gpu SKIPPED [100%]")
        print("FAILED tests/ops/test_a.py::test_bad - AssertionError: 2 != 3")
        print("SKIPPED [1] tests/ops/test_a.py:9: needs CUDA")
        sys.exit(1)
    out = args[args.index("--out") + 1]
    if "record" in args:  # one shape measured, then the next one crashes
        json.dump({"record": {"shapes": {"gpt2-small": {"record_over_bare": 0.9}}}}, open(out, "w"))
        sys.exit("Traceback: the second shape crashed")
    if "sae" in args:  # hangs: stopped by its limit
        print("sae: started", flush=True)
        time.sleep(60)
    if "comoments" in args:
        json.dump({"comoments": {"update_over_gemm": 0.91, "dtype": "torch.bfloat16"}},
                  open(out, "w"))
    if args[0].endswith("universality.py"):  # the key figure, then a crash in finalising
        json.dump({"update_over_gemm": 0.8, "dtype": "torch.bfloat16",
                   "study_5_seeds_min_1_device": 70.0}, open(out, "w"))
        sys.exit(3)
''')


def test_a_failing_step_loses_only_itself(tmp_path: Path) -> None:
    """``gpu_check.sh`` with every step misbehaving (pytest failures, a crash after one
    figure, a hang, a crash after the key figure): every other step still runs, the
    figures written survive, the summary names each failure, $OUT holds at most 8 files."""
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    py = tmp_path / "python3"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{stub}" "$@"\n')
    py.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(py), "REAL_PYTHON": sys.executable, "OUT": str(out),
           "T_SAE": "2"}  # fmt: skip
    proc = subprocess.run(["bash", str(CHECK)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    text = proc.stdout
    assert proc.returncode == 1, text[-3000:]
    assert len(list(out.iterdir())) <= 8
    assert "-- sae: STOPPED after 2s" in text and "sae: started" in text
    summary = text[text.index("== summary") :]
    assert "steps: pytest exit 1, record exit 1, sae timed out, comoments ok, universality exit 3" in summary
    assert "FAILED  tests/ops/test_a.py::test_bad  AssertionError: 2 != 3" in summary
    assert "SKIPPED tests/ops/test_a.py::test_gpu  needs CUDA" in summary
    assert "gpt2-small     0.900  ok" in summary
    assert "llama-3.2-1b   MISSING (step exit 1)" in summary
    assert "sae: MISSING (no file; step timed out)" in summary
    assert "comoments, torch.bfloat16, ): 0.910  ok" in summary
    assert "universality, torch.bfloat16, ): 0.800  BELOW GOAL" in summary
    assert "70.0 min on one device ok" in summary
    assert "finalising: MISSING (step exit 3)" in summary
    kept = (out / "summary.txt").read_text()
    assert "== environment" in kept and "FAILED  tests/ops/test_a.py::test_bad" in kept


# ---------------------------------------------------------------------------- summary


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary_under_test",
                                                  ROOT / "bench" / "gpu_summary.py")  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_of_a_cut_short_pytest_names_the_running_test() -> None:
    s = _summary_module()
    text = ("tests/ops/test_a.py::test_one PASSED [ 10%]\n"
            "tests/ops/test_a.py::test_two ERROR [ 20%]\n"
            "tests/ops/test_b.py::test_slow ")  # fmt: skip
    lines = s.pytest_lines(text, 124)
    assert lines[0] == "pytest: 1 error, 1 passed (timed out)"
    assert "  ERROR   tests/ops/test_a.py::test_two" in lines
    assert lines[-1] == "  RUNNING tests/ops/test_b.py::test_slow  (when the step was stopped)"
    crashed = s.pytest_lines("ImportError while loading conftest\nE   No module named 'x'\n", 4)
    assert crashed[0] == "pytest: no results (exit 4)" and "No module named 'x'" in crashed[-1]
    assert s.pytest_lines(None, None) == ["pytest: no output (not run)"]


def test_summary_never_fails_on_broken_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = _summary_module()
    (tmp_path / "record.json").write_text('{"record": {"shapes": {"gpt2-sma')  # cut mid-write
    (tmp_path / "sae.json").write_text(json.dumps({"sae": {"runs": {"bf16-autocast": {
        "topk": {"tok_s": 1.5e6}, "relu": {}}}}}))  # fmt: skip
    s.main([str(tmp_path), "--step", "record=137", "--step", "sae=0"])
    text = capsys.readouterr().out
    assert "record: MISSING (unreadable (JSONDecodeError); step killed (timeout or memory))" in text
    assert "topk 1,500,000, relu ?" in text and "TopK bf16: ok" in text
    assert "study, 5 GPT-2-small seeds x 100M tokens, one device (goal <= 90 min): MISSING" in text


# ---------------------------------------------------------------------------- projection


def test_the_study_projection_adds_the_forwards() -> None:
    """One device: every model's forward and covariances once, then each pair group's
    forwards (one per model it reads) and its share of the pair updates, one after another;
    on several devices, waves as long as their slowest group."""
    spec = importlib.util.spec_from_file_location("bench_universality_under_test",
                                                  ROOT / "bench" / "universality.py")  # fmt: skip
    uni = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(uni)
    from ops.plan import PairTile, Plan

    layers = [[0, 1]] * 3  # 3 models of 2 layers: pairs (0,1) (0,2) (1,2)
    groups = [[PairTile(0, 1, 0, 2)], [PairTile(0, 2, 0, 2), PairTile(1, 2, 0, 1)],
              [PairTile(1, 2, 1, 2)]]  # fmt: skip
    one = Plan(layers, [4] * 3, 1, 0, groups, [])
    f, p, o = 1.0, 10.0, 0.5
    # layers pass 3 x (f + o); groups: 2f + p, 3f + 1.5p, 2f + 0.5p
    assert uni.study_seconds(one, f, p, o, 1.0) == pytest.approx(3 * 1.5 + 2 + 10 + 3 + 15 + 2 + 5)
    two = Plan(layers, [4] * 3, 2, 0, groups, [])
    # layers pass: 2 waves of (f + o); groups: max(12, 18), then 7
    assert uni.study_seconds(two, f, p, o, 100.0) == pytest.approx(100 * (2 * 1.5 + 18 + 7))
