# phasestream: `make demo` and `make test` create .venv when it is missing, install the
# project into it (pinned by constraints.txt), and run the main job / the test suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.phasestream-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=
# make test runs its test files on this many pytest-xdist workers (one file per worker at a time, so that a
# module's Tiled server and model server stay with its tests); 0 runs them in this process, one after another
TEST_WORKERS ?= 2

.PHONY: demo test test-stack test-faults bench lint env clean services up status down

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "phasestream needs Python >= 3.11, found " + sys.version' 
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,models,methods]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/phasestream demo $(DEMO_ARGS)

# PostgreSQL and Redis for the tests that run Tiled on them (installed when missing; never fatal)
services:
	@bash .ci/ensure-services.sh

test: $(STAMP) services
	$(BIN)/python -m pytest -m "not faults and not stack and not cluster and not browser and not slow" \
		-n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the whole service started with `phasestream up` (embedded and PostgreSQL Tiled, Dask, model server),
# the Procfile under honcho, the tests that start Dask clusters or the demo's processes (marker cluster),
# the tests that watch the view in a headless Chromium (marker browser), and the longest end-to-end tests
# (marker slow: demo runs, model training, whole-catalog checks of hostile documents), which keep make test
# under 15 minutes on a 2-core machine
test-stack: $(STAMP) services
	$(BIN)/python -m pytest -m "stack or cluster or browser or slow" $(PYTEST_ARGS)

# processes killed and restarted (worker SIGTERM/SIGKILL, Tiled killed during a final write); docs/security.md
test-faults: $(STAMP) services
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

# the whole service on this host (UP_ARGS e.g. --tiled-config deploy/tiled/config.yml); see deploy/README.md
UP_ARGS ?=
up: $(STAMP)
	$(BIN)/phasestream up $(UP_ARGS)

status: $(STAMP)
	$(BIN)/phasestream status

down: $(STAMP)
	$(BIN)/phasestream down

bench: $(STAMP)
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/stream.py
	$(BIN)/python benchmarks/scale.py

# ruff, the layer contract (import-linter, pyproject.toml) and the structure check (no import cycle
# between top-level parts, no module over 500 lines; docs/architecture.md)
lint: $(STAMP)
	$(BIN)/ruff check phasestream tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_architecture.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
