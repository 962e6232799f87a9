# trmrl -- one entry point for the common jobs. Every target sets up .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export MUJOCO_GL ?= disable

.PHONY: help venv demo test lint typecheck pytest fast-test format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): pyproject.toml clients/pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements/constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e './clients[stream]' -e '.[dev]'
	# openpi-client (tests of the openpi-compatible endpoint) pins numpy<2 without needing it.
	$(PY) -m pip install --quiet --no-deps openpi-client==0.1.2
	touch $(STAMP)

venv: $(STAMP)  ## create .venv with pinned dependencies (CPU torch)

demo: $(STAMP)  ## the main job: serve the bundled TrMRL checkpoint and its references, run held-out tasks through it
	$(PY) -m trmrl_client.demo

test: lint typecheck pytest  ## everything CI runs: lint, type checks, all tests

lint: $(STAMP)  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)  ## mypy over the packages
	$(VENV)/bin/mypy

pytest: $(STAMP)  ## all tests
	$(PY) -m pytest

fast-test: $(STAMP)  ## tests without the slow marker
	$(PY) -m pytest -m "not slow"

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
