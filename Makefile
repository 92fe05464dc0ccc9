# make demo: set up, shard a random Llama over 2 ranks, show it matches the unsharded model
# make test: set up, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate setup.cfg pyproject.toml
	# torch first and pinned: the local CPU wheel, never a newer CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node 2 --master-port 29533 tools/demo.py

# two workers, each a whole test file at a time (a file's multi-rank results are computed once
# per world size and shared by its tests): about half the time of one worker on 2 cores
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) *.egg-info
