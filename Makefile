# The two README commands. Each sets up .venv on a fresh machine (scripts/setup.sh is a no-op
# when nothing changed) and then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean stack-up stack-down

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m flows.cli run demo $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .prefect .mlflow .pytest_cache

# The operations stack on loopback (Prefect server + worker, MLflow server, S3 via moto) with the
# deployments registered; see docs/operations.md. Pass options with ARGS="--timezone Europe/Berlin".
stack-up: setup
	$(PY) scripts/stack.py up $(ARGS)

stack-down:
	$(PY) scripts/stack.py down
