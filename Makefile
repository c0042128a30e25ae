# bridgekit: every target creates or refreshes the project virtual environment (.venv) by itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv demo test lint unit browser lab bench clean

help:
	@echo "make demo   start the local tenant emulator, sync it, run the assessment, print the report path"
	@echo "make test   lint (ruff, mypy --strict) and the whole test suite against the emulator"
	@echo "           (installs Debian's chromium first when missing and run as root: reports are checked in it)"
	@echo "make lab    JupyterLab on notebooks/ and runbooks/"
	@echo "make bench  benchmarks (figures go to BENCHMARKS.md)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "bridgekit needs Python 3.11+; set PYTHON=python3.11 (or newer)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing bridgekit and its dependencies into $(VENV) (first time takes a few minutes)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,lab]'
	@$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (bridgekit)" >/dev/null
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(BIN)/nbstripout --install --attributes .gitattributes; fi
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@$(BIN)/python -m bridgekit demo

lint: $(STAMP)
	@echo "==> ruff"
	@$(BIN)/ruff check bridgekit tests bench
	@echo "==> mypy --strict bridgekit"
	@$(BIN)/mypy

unit: $(STAMP)
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

# The report test renders the HTML reports in headless Chromium (Debian's package). Installed here, as root,
# only when missing; apt-get update runs only when the package index does not know chromium yet.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "==> installing Debian's chromium for the headless report test"; \
		apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "warning: /usr/bin/chromium is missing: install Debian's chromium (apt-get install -y chromium) or the report test fails" >&2; \
	fi

test: lint browser unit

lab: $(STAMP)
	@$(BIN)/jupyter lab --notebook-dir=. notebooks/

bench: $(STAMP)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
