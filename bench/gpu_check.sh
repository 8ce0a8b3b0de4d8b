#!/usr/bin/env bash
# The one prepared run for a session that has the GPU machine (../shared/ENV.md: python3,
# torch, transformers, triton, numba, numpy, scipy, pytest; no Ray, Prefect, Zarr, dask, no
# corpus packages; 10 minutes a command; only $OUT comes back, at most 8 files). From the
# repository root:
#
#   OUT=/some/dir bash bench/gpu_check.sh            # at most 479 s, start-up excluded
#   OUT=/some/dir bash bench/gpu_check.sh --cpu-smoke   # the same steps on CPU, tiny sizes
#
# Built so that a failure loses only the step that failed: every step is its own process
# with its own time limit (448 s in all, 479 s with the grace before a kill), output
# unbuffered, and every figure written to its JSON file as soon as it exists.
#
#   pytest        the tests below on CUDA (pytest.txt): fused statistics against numba and
#                 float64 and the no-sync check; the recording pass waits for nothing of ours;
#                 taxonomy counters on the device against numba, bit-reproducible; co-moments
#                 and in-place accumulation; a finalised universality tile against the CPU's;
#                 SAE steps that do not wait for the device; a seed trained on the GPU;
#   record        bench/gpu.py --section record (record.json, written after each model shape):
#                 record ÷ bare forward for SmolLM2, GPT-2-small, Llama-1B shapes (goal >= 0.85);
#   sae           bench/gpu.py --section sae (sae.json, after each precision): SAE training
#                 tok/s and TFLOP/s per architecture (goal: TopK in bf16 >= 1M tok/s);
#   comoments     bench/gpu.py --section comoments (comoments.json): update ÷ GEMM;
#   universality  bench/universality.py (universality.json: update ÷ GEMM first (goal >= 0.85
#                 in bf16), then the projected study (goal <= 90 min on one device), then
#                 the finalisation of one pair);
#   summary       bench/gpu_summary.py: every FAILED / ERROR / SKIPPED test and every figure
#                 against its goal, on the console and at the end of summary.txt.
#
# $OUT holds 7 files: summary.txt (versions, devices, the summary), pytest.txt, bench.log (the
# benches' output), record.json, sae.json, comoments.json, universality.json. The exit code is
# 0 when every step exited 0 (a figure below its goal is not a failure of the script).
set -u
cd "$(dirname "$0")/.."
SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: OUT=dir bash bench/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/neuronmap-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
FILES="summary.txt pytest.txt bench.log record.json sae.json comoments.json universality.json"
for f in $FILES; do rm -f "$OUT/$f"; done
rm -f "$OUT"/*.tmp
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

TESTS="tests/ops/test_fused.py tests/ops/test_engine.py tests/ops/test_stats.py
  tests/ops/test_taxonomy.py tests/ops/test_correlation.py tests/ops/test_universality.py
  tests/ops/test_sae.py tests/ops/test_seeds.py"
# step limits in seconds (sum 448; each may run 4 s more before it is killed, nvidia-smi 3:
# 479 s at most); the
# environment may lower them (tests/test_bench_gpu.py does, to test a step that hangs)
T_ENV=${T_ENV:-12} T_PYTEST=${T_PYTEST:-150} T_RECORD=${T_RECORD:-105} T_SAE=${T_SAE:-45}
T_COMOMENTS=${T_COMOMENTS:-35} T_UNIVERSALITY=${T_UNIVERSALITY:-95} T_SUMMARY=${T_SUMMARY:-6}
if [ "$SMOKE" = 1 ]; then
  GPU_ARGS="--device cpu --small --rounds 2"
  UNIVERSALITY_ARGS="--small --reps 2"
else
  GPU_ARGS=""
  UNIVERSALITY_ARGS=""
fi
STEPS=()
FAILED=0

# run_step NAME LIMIT LOG COMMAND...: run it under its limit, its output appended to LOG;
# print the step's last lines and its status.
run_step() {
  local name=$1 limit=$2 log=$3 before rc
  shift 3
  echo "== $name (limit ${limit}s): $*"
  echo "== $name: $*" >> "$log"
  before=$(stat -c %s "$log")
  timeout -k 4 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  tail -c +"$((before + 1))" "$log" | tail -n 30
  case $rc in
    0) echo "-- $name: ok" ;;
    124|137) echo "-- $name: STOPPED after ${limit}s (exit $rc)" ;;
    *) echo "-- $name: FAILED (exit $rc)" ;;
  esac
  STEPS+=(--step "$name=$rc")
  [ "$rc" = 0 ] || FAILED=1
}

{
  echo "== environment ($(date -u +%FT%TZ), smoke=$SMOKE)"
  timeout 3 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
    || echo "(no nvidia-smi)"
  timeout -k 4 "$T_ENV" "$PY" - <<'PY' 2>&1
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "triton", "numba", "numpy", "scipy", "pytest"):
    try:
        print(f"{name:<13}", importlib.import_module(name).__version__)
    except Exception as e:
        print(f"{name:<13} MISSING ({e.__class__.__name__}: {e})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}")
PY
} | tee "$OUT/summary.txt"

# shellcheck disable=SC2086  # the lists are meant to split
run_step pytest "$T_PYTEST" "$OUT/pytest.txt" "$PY" -m pytest -v -p no:cacheprovider $TESTS
# shellcheck disable=SC2086
run_step record "$T_RECORD" "$OUT/bench.log" "$PY" bench/gpu.py $GPU_ARGS --section record \
  --out "$OUT/record.json"
# shellcheck disable=SC2086
run_step sae "$T_SAE" "$OUT/bench.log" "$PY" bench/gpu.py $GPU_ARGS --section sae \
  --out "$OUT/sae.json"
# shellcheck disable=SC2086
run_step comoments "$T_COMOMENTS" "$OUT/bench.log" "$PY" bench/gpu.py $GPU_ARGS \
  --section comoments --out "$OUT/comoments.json"
# shellcheck disable=SC2086
run_step universality "$T_UNIVERSALITY" "$OUT/bench.log" "$PY" bench/universality.py \
  $UNIVERSALITY_ARGS --out "$OUT/universality.json"

rm -f "$OUT"/*.tmp  # a writer killed mid-file leaves its temporary behind
SMOKE_ARG=()
[ "$SMOKE" = 1 ] && SMOKE_ARG=(--smoke)
timeout -k 4 "$T_SUMMARY" "$PY" bench/gpu_summary.py "$OUT" "${STEPS[@]}" "${SMOKE_ARG[@]}" \
  | tee -a "$OUT/summary.txt"
exit "$FAILED"
