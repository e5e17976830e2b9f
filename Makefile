# Two commands: `make demo` and `make test` (and `make bench`). Each creates .venv when missing.
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build for the project's torch range.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/peftfx: pyproject.toml setup.py peftfx/_round.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/peftfx
	$(BIN)/python -m peftfx.demo

test: $(BIN)/peftfx
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n auto --dist worksteal

lint: $(BIN)/peftfx
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# CPU benchmarks beside PEFT (each writes bench/results/<name>.md and .json), then bench/RESULTS.md and its plot.
bench: $(BIN)/peftfx
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
