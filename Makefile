# The two commands: `make demo` and `make test` (each sets up .venv first if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lint clean

setup:
	@launch/setup.sh

demo: setup
	$(PY) -m recdistill.cli demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the tests not marked slow: no multi-process training runs, no end-to-end demo, no wheel build
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m recdistill.cli bench all $(ARGS)

lint: setup
	$(VENV)/bin/ruff check recdistill kernels tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
