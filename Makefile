# The two commands a new user runs on a fresh machine; each installs what it needs into .venv.
#   make demo   the main job locally: emulator, both functions, demo data, a real run, the report
#   make test   Chromium for the console's tests (installed as root on Debian), ruff, then
#               pytest against the real Firestore emulator (started by the tests)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean browser

$(STAMP): requirements.txt requirements-test.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	@touch $(STAMP)

install: $(STAMP)

# The project's own code only: packages of the user's own operations beside shared/ are theirs.
LINTED := shared functions tests scripts bench examples deploy

# The console's browser tests drive Debian's Chromium through its chromedriver (nothing is
# downloaded). Missing: installed when run as root on Debian (as CI runs), else make stops at
# once with the one command to run. Overridable, so a test can try each path without apt.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
APT_GET ?= apt-get
USER_ID ?= $(shell id -u)
BROWSER_PACKAGES := chromium chromium-driver

MISSING_BROWSER = $(if $(and $(wildcard $(CHROMIUM)),$(wildcard $(CHROMEDRIVER))),,yes)
CAN_INSTALL = $(and $(filter 0,$(USER_ID)),$(shell command -v $(APT_GET)))
NEEDS_BROWSER = make test needs Chromium and its driver for the console's browser tests; run: \
  sudo apt-get install -y $(BROWSER_PACKAGES)

# Expanded before anything runs: $(error) stops make at once, with one line.
browser:
	$(if $(MISSING_BROWSER),$(if $(CAN_INSTALL),,$(error $(NEEDS_BROWSER))))
	@$(if $(MISSING_BROWSER),echo "installing $(BROWSER_PACKAGES) for the console's browser tests" >&2)
	@$(if $(MISSING_BROWSER),$(APT_GET) update -qq)
	@$(if $(MISSING_BROWSER),DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq $(BROWSER_PACKAGES) >/dev/null)
	@[[ -x $(CHROMIUM) && -x $(CHROMEDRIVER) ]] || { echo "$(NEEDS_BROWSER)" >&2; exit 2; }

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# browser first: a machine that cannot run the suite is told so before anything else runs.
test: browser lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf build outbox .demo .pytest_cache .ruff_cache
