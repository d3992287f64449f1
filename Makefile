# The two README commands. Each sets up .venv on a fresh machine (scripts/setup.sh is a no-op
# when nothing changed) and then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m mydistill.cli run demo $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .prefect .mlflow .pytest_cache
