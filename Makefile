# The two set-up commands: `make demo` runs the whole chain on the embedded default,
# `make test` passes the tests. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= .tsdn/demo
PYTEST_ARGS ?=

.PHONY: install test lint format demo serve-demo bench-surf clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision first, pinned to the builds this kind of machine carries on disk; then the project, with the
# numerical libraries at the releases its figures were measured with (constraints.txt).
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,offline,export]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# One intra-op thread per process: the suite runs a driver plus Ray workers on two cores, and spinning
# OpenMP threads of several processes fighting for the same cores cost more than they gain.
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/tsdn demo --workdir $(DEMO_DIR)

serve-demo: $(STAMP)
	$(BIN)/tsdn serve --store $(DEMO_DIR)/store --host 127.0.0.1 --port 8000

bench-surf: $(STAMP)
	$(BIN)/python benchmarks/bench_surf.py

clean:
	rm -rf .tsdn build dist *.egg-info .pytest_cache .ruff_cache
