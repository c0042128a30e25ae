# bridgekit: every target creates or refreshes the project virtual environment (.venv) by itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv git-filter demo test lint unit browser azurite package-test lab bench clean

help:
	@echo "make demo   start the local tenant emulator, sync it, run the assessment, print the report path"
	@echo "make test   lint (ruff, mypy --strict), the whole test suite against the emulator, and package-test"
	@echo "           (installs Debian's chromium first when missing and run as root: reports are checked in it;"
	@echo "           and Azurite, the Azure Storage emulator, from npm when missing: the lake tests write to it)"
	@echo "make package-test  the built wheel in a fresh core-only environment runs assess and win_probability"
	@echo "make lab    JupyterLab on the repository: notebooks/ and runbooks/ (LAB_ARGS=... passes options)"
	@echo "make bench  benchmarks (figures go to BENCHMARKS.md)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "bridgekit needs Python 3.11+; set PYTHON=python3.11 (or newer)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing bridgekit and its dependencies into $(VENV) (first time takes a few minutes)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,lab]'
	@$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (bridgekit)" >/dev/null
	@$(MAKE) --no-print-directory git-filter
	@touch $(STAMP)

# nbstripout as the git filter for notebooks (.gitattributes names it), keeping cell ids: without --keep-id it
# renumbers them and git reports every committed notebook as modified. Set here rather than with
# `nbstripout --install`, which cannot pass --keep-id to the filter.
NBSTRIPOUT = "$(abspath $(BIN))/python" -m nbstripout
git-filter:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		git config filter.nbstripout.clean '$(NBSTRIPOUT) --keep-id' && \
		git config filter.nbstripout.smudge cat && \
		git config filter.nbstripout.required true && \
		git config diff.ipynb.textconv '$(NBSTRIPOUT) -t'; \
	fi

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

# The lake tests write Delta tables to Azurite (Microsoft's Azure Storage emulator, an npm package), which they
# start on loopback. Installed here when missing, pinned, into a cache outside the checkout (a clean clone stays
# clean and every clone shares it); tests/azurite.py looks for it there. 3.37.0: 3.35.0 ignores List Blobs'
# startFrom, which breaks deltalake's log listing after the second commit.
AZURITE_VERSION := 3.37.0
AZURITE_DIR ?= $${XDG_CACHE_HOME:-$$HOME/.cache}/bridgekit/azurite-$(AZURITE_VERSION)
azurite:
	@if [ -x "$(AZURITE_DIR)/node_modules/.bin/azurite-blob" ]; then :; else \
		if ! command -v npm >/dev/null 2>&1; then \
			if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
				echo "==> installing Debian's nodejs and npm for Azurite"; \
				apt-cache policy npm 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq; \
				DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
			else \
				echo "error: npm is missing: install Node.js and npm (the lake tests need Azurite from npm)" >&2; exit 1; \
			fi; \
		fi; \
		echo "==> installing Azurite $(AZURITE_VERSION) with npm into $(AZURITE_DIR)"; \
		mkdir -p "$(AZURITE_DIR)" && \
		npm install --prefix "$(AZURITE_DIR)" --no-audit --no-fund --loglevel=error "azurite@$(AZURITE_VERSION)" >/dev/null; \
	fi

# The wheel as an ops host installs it: core dependencies only, run from outside the repository (.ci/package-test).
package-test:
	@PYTHON=$(PYTHON) .ci/package-test

test: lint browser azurite unit package-test

# The repository root, so notebooks/ and runbooks/ both show; Jupyter refuses root without --allow-root.
LAB_ARGS ?=
lab: $(STAMP)
	@$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

bench: $(STAMP) azurite
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
