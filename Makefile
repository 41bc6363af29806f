# Two commands that work on a fresh machine:
#   make demo   create .venv if missing, install, run the main job on the built-in tiny VLM
#   make test   same set-up, run the tests (with CI=true also the tests marked slow)

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# torch 2.13.0's CPU wheel lies on the development machines' disk; override for other set-ups.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.graphlora-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist). On the 2-core CI machine two took the slow-included run from 13 to 8
# minutes (measured 2026-11-29). Each worker holds its own models and traces: raise it only with the
# memory to match.
TEST_WORKERS ?= 2

ifeq ($(CI),true)
  SLOW_FLAG := --runslow
endif

.PHONY: demo test setup clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m graphlora demo

# Debian's chromium for the headless-browser test of `graphlora dump` (tests/test_dump.py). Installed
# only when missing; if it cannot be installed (no root/sudo, no apt-get) those tests skip with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium || \
	  { $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium; } || \
	  echo "warning: could not install chromium; the headless-browser tests will skip"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -rs --timeout=1200 -n $(TEST_WORKERS) $(SLOW_FLAG) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
