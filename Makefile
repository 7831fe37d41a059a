# The two commands of the README: `make run` (the main job, defaults) and `make test` (the test suite).
# Both create the virtual environment and install the project on first use.
# any Python >= 3.11 (tested: 3.11)
PYTHON ?= python3.11
VENV ?= .venv
# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU-only torch build first (a far smaller
# download than the default CUDA build); empty: torch comes from PyPI with the other dependencies
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench bench-gpu clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python >= 3.11) on PATH, or make PYTHON=/path/to/python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sbn-train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_step.py $(ARGS)

bench-gpu: $(STAMP)
	PYTHON=$(PY) bash scripts/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
