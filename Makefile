# Every target installs what it needs first, so each works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test test-fast bench lint format

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,eval]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/shortened serve

test: install
	bash scripts/test-services.sh
	$(PY) -m pytest

test-fast: install
	bash scripts/test-services.sh
	$(PY) -m pytest -m "not e2e"

bench: install
	$(PY) -m bench.run_all

LINTED := service worker shortened tests bench scripts migrations

lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)
