# The two commands of the README: `make run` (the main job, defaults) and `make test` (the test suite).
# Both create the virtual environment and install the project on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench bench-gpu clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
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
