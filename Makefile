# Every target sets itself up first. Knobs: STORE=, VIDEOS=, CONFIG=, RAY_ADDRESS=.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STORE  ?= recap-store
VIDEOS ?=
CONFIG ?=
RAY_ADDRESS ?=

RECAP := $(if $(RAY_ADDRESS),RAY_ADDRESS=$(RAY_ADDRESS) )$(BIN)/recap
OPTS  := --store $(STORE) $(if $(CONFIG),--config $(CONFIG))

.PHONY: setup demo test ingest features captions segments summaries train eval run status bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(RECAP) demo $(if $(filter-out recap-store,$(STORE)),--store $(STORE))

# A test file per worker (module fixtures are built once), as many workers as cores, at most 4.
test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

ingest: setup
	@test -n "$(VIDEOS)" || { echo "usage: make ingest VIDEOS=folder-or-list [STORE=...]"; exit 2; }
	$(RECAP) ingest $(VIDEOS) $(OPTS)

features captions segments summaries train: setup
	$(RECAP) $@ $(OPTS)

eval: setup
	$(RECAP) evaluate $(OPTS)

run: setup
	$(RECAP) run $(OPTS)

status: setup
	$(RECAP) status $(OPTS)

# The benchmarks that need nothing but the code; the others read a demo store (`python bench/X.py STORE`).
SELF_CONTAINED_BENCH = concurrent_runs fault_table features generation search
bench: setup
	@for b in $(SELF_CONTAINED_BENCH); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

clean:  # build and cache files only: stores and generated corpora are yours to delete
	rm -rf $(VENV) *.egg-info .pytest_cache bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
