#!/usr/bin/env bash
# The one prepared run for a session that has the GPU machine (see ../shared/ENV.md: torch,
# transformers, triton, numba, numpy, scipy; no Ray, Prefect or Zarr). From the repository root:
#
#   OUT=/some/dir bash bench/gpu_check.sh        # ~8 min on an H200, start-up excluded
#
# 1. the CUDA tests of ops/ (the fused statistics against numba and float64, the no-sync
#    check, co-moments, universality finalising, SAEs, seeds, taxonomy counters);
# 2. bench/gpu.py: record ÷ bare forward for three model shapes (goal >= 0.85), SAE training
#    tok/s and TFLOP/s per architecture (goal: TopK >= 1M tok/s), co-moment update ÷ GEMM;
# 3. bench/universality.py: the GPT-2-small pair update ÷ GEMM (goal >= 0.85 in bf16) and the
#    projected time of the study (5 seeds x 100M tokens) on 1 and 8 GPUs.
# Each step's output goes to $OUT (text and JSON); a failing step does not stop the others.
set -u
OUT=${OUT:-/tmp/neuronmap-gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" \
  >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

echo "== CUDA tests of ops/"
timeout 240 python -m pytest -q -p no:cacheprovider --durations=10 \
  tests/ops/test_fused.py tests/ops/test_stats.py tests/ops/test_taxonomy.py \
  tests/ops/test_correlation.py tests/ops/test_universality.py tests/ops/test_sae.py \
  tests/ops/test_seeds.py > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/pytest.txt"

echo "== bench/gpu.py"
timeout 300 python bench/gpu.py --json > "$OUT/gpu.json" 2> "$OUT/gpu.err"
echo "bench/gpu.py exit $?"; tail -5 "$OUT/gpu.err"
python - "$OUT/gpu.json" <<'PY'
import json, sys
from bench import gpu
r = json.load(open(sys.argv[1]))
show = {"record": gpu.print_record, "sae": gpu.print_sae, "comoments": gpu.print_comoments}
for section, print_it in show.items():
    if section in r:
        print_it(r[section], r["device"], r["rounds"])
PY

echo "== bench/universality.py"
timeout 180 python bench/universality.py --json > "$OUT/universality.json" 2> "$OUT/universality.err"
echo "bench/universality.py exit $?"; cat "$OUT/universality.json" | head -60
