# Geo-Sharing: `make run` starts the service, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# The slow tests CI runs on top of the quick suite (each is bounded: restart, schemathesis, MiniLM smoke).
SLOW_SELECTION ?= tests

.PHONY: install run test test-quick test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel on local disk, so nothing pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[worker,service,postgres,dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/geoshare serve --host 127.0.0.1 --port 8000 --db geoshare.db

lint: install
	$(BIN)/ruff check .

test-quick: install
	$(BIN)/python -m pytest -q -m "not slow"

test: lint test-quick
	# exit code 5 means the selection holds no slow test, which is fine
	$(BIN)/python -m pytest -q -m slow $(SLOW_SELECTION) || [ $$? -eq 5 ]

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/solver_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
