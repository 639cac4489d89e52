# Every target installs what it needs into .venv, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: install
	@echo "make demo: the three-phase toy run arrives with the training issue; nothing to run yet."

# Speed is measured here, never in tests; see BENCHMARKS.md for recorded figures.
bench: install
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_loader.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
