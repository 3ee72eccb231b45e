# phasestream: `make demo` and `make test` create .venv when it is missing, install the
# project into it (pinned by constraints.txt), and run the main job / the test suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.phasestream-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test bench lint env clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "phasestream needs Python >= 3.11, found " + sys.version' 
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/phasestream demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/stream.py

lint: $(STAMP)
	$(BIN)/ruff check phasestream tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
