# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use from the
# pins in requirements-dev.txt (the one place the development environment is pinned) and start at
# once when it is current.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench lint clean

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crossent demo

# pytest exits 5 when it collects nothing: make treats that, like any failure, as an error.
# Two workers for the suite; the tests marked bigmem (several GB) run afterwards, alone, and only
# that second run may find none (exit 5).
test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not bigmem" $(PYTEST_ARGS)
	$(PY) -m pytest -m bigmem $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The suite (tables, CSV, plots, its section of benchmarks/RESULTS.md), then the detailed scripts.
bench: $(STAMP)
	$(VENV)/bin/crossent bench
	$(PY) benchmarks/bench_cross_entropy.py
	$(PY) benchmarks/bench_linear_cross_entropy.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
