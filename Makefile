# `make demo` and `make test` each set everything up on a fresh machine (Python 3.11+).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pytest-xdist processes for `make test` / `make test-all`, each test file whole in one of them
TEST_WORKERS ?= 2

.PHONY: install demo test test-all notebooks device-check clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install neo-jax with pinned dependencies

demo: $(STAMP)  ## the main job: tiny NEO, pretrain -> SFT -> ACPO on easy-vqa, on CPU
	$(BIN)/neo-jax demo

test: $(STAMP)  ## the default (fast) test suite, in TEST_WORKERS processes
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)  ## everything, slow tests included
	$(BIN)/python -m pytest -m "" -n $(TEST_WORKERS) --dist loadfile

notebooks: $(STAMP)  ## run notebooks/*.ipynb top to bottom and save them with their outputs
	$(BIN)/python notebooks/refresh.py

# No install step: a GPU/TPU host runs it with its own python3 (jax, flax, optax, numpy).
DEVICE_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
device-check:  ## one GPU or TPU host, <= 8 min: kernels, train step, generation (CPU: smoke mode)
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
	  $(DEVICE_PYTHON) benchmarks/device_check.py $(ARGS)

clean:
	rm -rf $(VENV) workdir .pytest_cache
