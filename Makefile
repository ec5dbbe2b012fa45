# The README's two commands: `make study` (default study -> reports/digits/) and `make test`.
# Both create .venv and install normzoo into it on first use (needs python3 >= 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.normzoo-installed

.PHONY: install study study-v1 test lint bench clean-sweeps gpu-check brn-tune

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

# one pytest worker per core (at most 4), a test file per worker: 6 min 42 s on the 2-core VM
# against 9-10 min in one process; `$(BIN)/python -m pytest` alone runs it serially
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

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

# Batch Renorm's schedule, chosen on validation: three candidate sweeps, then the table
# reports/digits/design/brn_schedule.md (the choice goes into digits_base.yaml's norm_options)
brn-tune: $(STAMP)
	$(BIN)/normzoo-train -m experiment=digits_brn_tune
	$(BIN)/normzoo-train -m experiment=digits_brn_tune hydra.sweep.dir=multirun/digits_brn_tune/ema_hold norm.relax_start=0.5 norm.rmax_relaxed=0.85 norm.dmax_relaxed=0.7
	$(BIN)/normzoo-train -m experiment=digits_brn_tune hydra.sweep.dir=multirun/digits_brn_tune/fast_ema norm.momentum=0.1
	$(BIN)/python scripts/brn_schedule_table.py
