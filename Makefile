# headwater: the two commands a new machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo up test test-fast test-faults bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "headwater needs Python 3.11, this is " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## run the demo: embedded Kafka + ClickHouse, simulated workload, analyst report
	$(BIN)/headwater demo

up: $(STAMP)
	$(BIN)/headwater up

test: $(STAMP)  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## unit tests only, no broker or ClickHouse
	$(BIN)/python -m pytest -m "not pipeline and not docker"

test-faults: $(STAMP)  ## the fault suite at full length (20 kills, a 30 s ClickHouse outage, ...); make test runs it short
	HEADWATER_FAULTS=full $(BIN)/python -m pytest tests/faults -m faults

BENCH_ARGS ?=
bench: $(STAMP)  ## the benchmark, one run on one broker: table + bench/results/latest.json (BENCH_ARGS="--full", "--quick", ...)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .headwater .pytest_cache
