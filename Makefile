# The README's two commands: `make study` (default study -> reports/digits/) and `make test`.
# Both create .venv and install normzoo into it on first use (needs python3 >= 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.normzoo-installed

.PHONY: install study study-v1 test lint bench clean-sweeps gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the default study: three sibling sweeps of one design (multirun/digits/{ghost,reference,noniid}),
# then one report from all three (reports/digits/report.md)
study: $(STAMP)
	$(BIN)/normzoo-train -m experiment=digits
	$(BIN)/normzoo-train -m experiment=digits_reference
	$(BIN)/normzoo-train -m experiment=digits_noniid
	$(BIN)/normzoo-report multirun/digits --out reports/digits

# the first, fixed-epoch study (reports/digits_v1)
study-v1: $(STAMP)
	$(BIN)/normzoo-train -m experiment=digits_v1

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# as the README: one torch thread (the default thread count made the ratios swing between runs)
bench: $(STAMP)
	$(BIN)/normzoo-bench --threads 1

# the sweeps' and single runs' result dirs (multirun/, outputs/); the shipped reports/ stay
clean-sweeps:
	rm -rf multirun outputs

gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh
