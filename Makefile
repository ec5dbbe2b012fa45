# The README's two commands: `make study` (default study -> reports/digits/) and `make test`.
# Both create .venv and install normzoo into it on first use (needs python3 >= 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.normzoo-installed
STUDY ?= digits

.PHONY: install study test lint bench clean-sweeps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(BIN)/normzoo-train -m experiment=$(STUDY)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/normzoo-bench

gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh
