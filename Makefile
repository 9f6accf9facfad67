# The two commands a new user runs on a fresh machine; each installs what it needs into .venv.
#   make demo   the main job locally: emulator, both functions, demo data, a real run, the report
#   make test   ruff, then pytest against the real Firestore emulator (started by the tests)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): requirements.txt requirements-test.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	@touch $(STAMP)

install: $(STAMP)

# The project's own code only: packages of the user's own operations beside shared/ are theirs.
LINTED := shared functions tests scripts bench examples

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

test: lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf build outbox .demo .pytest_cache .ruff_cache
