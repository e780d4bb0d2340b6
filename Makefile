# dlfs: `make train` and `make test` do all the set-up (a .venv in this folder) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dlfs
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-python test-slow test-gpu lint reproduce bench mutate clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  (pass options to dlfs with ARGS, e.g. make train ARGS='experiment=book_boston')"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package's metadata changes; the install is editable, so code edits need none.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $@

install: $(STAMP) ## create .venv if missing and install dlfs with its dev tools

train: install ## run `dlfs train` (the embedded default: Boston housing MLP)
	$(BIN)/dlfs train $(ARGS)

test: install ## the fast offline tests, on every core (pytest-xdist)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup $(ARGS)

# pyenv's interpreters (where pyenv is installed) go on PATH for tox: its shims find only the selected version.
# Not the free-threaded builds (3.13.0t): torch's wheels for them are another story.
PYENV_BINS := $(filter-out %t/bin,$(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.1[0-3].*/bin))
empty :=
space := $(empty) $(empty)

test-python: install ## the fast tests on Python 3.10-3.13, each found (tox, a venv each; PY=3.12: one)
	PATH="$(subst $(space),:,$(PYENV_BINS))$(if $(PYENV_BINS),:)$$PATH" $(BIN)/tox run $(if $(PY),-e $(PY)) $(if $(ARGS),-- $(ARGS))

test-slow: install ## the slow tests only
	$(BIN)/python -m pytest -q -m slow $(ARGS)

test-gpu: install ## the GPU tests only (each skips, saying why, where CUDA is missing)
	$(BIN)/python -m pytest -q -m gpu $(ARGS)

reproduce: install ## `dlfs reproduce`: the book's chapter-7 table, re-run (non-zero exit when a number misses)
	$(BIN)/dlfs reproduce $(ARGS)

bench: install ## the benchmarks (tests/benchmarks; about 10 minutes) and the table of speed targets
	$(BIN)/python tests/benchmarks/run_all.py $(ARGS)

# cosmic-ray in a venv of its own (its SQLAlchemy 2 would clash with the optuna extra's SQLAlchemy < 2)
MUTATE_VENV := .venv-mutate

mutate: install ## mutation testing of the modules that keep promises (cosmic-ray; hours; MODULES=dlfs_cli/resume.py: one)
	test -x $(MUTATE_VENV)/bin/cosmic-ray || ($(PYTHON) -m venv $(MUTATE_VENV) && $(MUTATE_VENV)/bin/pip install "cosmic-ray>=8.3,<9")
	$(BIN)/python tests/mutation/run.py $(MODULES)

lint: install ## ruff + mypy
	$(BIN)/ruff check dlfs_cli tests
	$(BIN)/ruff format --check dlfs_cli tests
	$(BIN)/mypy

clean: ## remove the virtual environment and caches (runs in outputs/ are kept)
	rm -rf $(VENV) $(MUTATE_VENV) .tox build *.egg-info .pytest_cache .ruff_cache .mypy_cache
