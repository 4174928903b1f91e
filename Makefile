# Two entry points for a fresh machine: `make run` (serve the bundled models and open the UI; Ctrl-C
# stops) and `make test` (lint + tests).
# Both create .venv on first use and reuse it after; it is updated when pyproject.toml changes.
# `make run` needs only the serving install (no torch: seconds, not minutes); `make test` adds the
# training stack and the test tools (extra `dev`, which includes `train`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.thali-serve
DEV_STAMP := $(VENV)/.thali-dev

export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: run test test-fast lint typecheck format clean browser

$(SERVE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e .
	touch $(SERVE_STAMP)

$(DEV_STAMP): pyproject.toml domains/plant_disease/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]' -e domains/plant_disease
	touch $(DEV_STAMP) $(SERVE_STAMP)

# make run ARGS="--port 8100 --ui-port 8600" passes options to `thali up`.
run: $(SERVE_STAMP)
	$(BIN)/thali up --ui-domain south_asian_food $(ARGS)

lint: $(DEV_STAMP) typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy reads the `thali` namespace through links (it cannot follow setuptools' package-dir mapping).
MYPY_ROOT := build/mypy
typecheck: $(DEV_STAMP)
	@mkdir -p $(MYPY_ROOT)/thali && touch $(MYPY_ROOT)/thali/__init__.py
	@for d in core plugins registry api ui testing domains; do ln -sfn ../../../$$d $(MYPY_ROOT)/thali/$$d; done
	cd $(MYPY_ROOT) && ../../$(BIN)/mypy --config-file ../../pyproject.toml \
	  -p thali.core -p thali.plugins -p thali.registry -p thali.api -p thali.ui -p thali.testing

test: lint browser
	$(BIN)/python -m pytest

# The tests not marked slow (no training run, export, server or installed-package check): a quick loop
# while editing. `make test` and CI run everything.
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The UI's end-to-end test drives headless Chromium; install it where apt-get can (as root), else the
# test skips with the reason.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "note: chromium not installed; the browser test will skip"; }

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build dist
