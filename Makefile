# `make demo` and `make test` each set everything up on a fresh machine (Python 3.11+).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install neo-jax with pinned dependencies

demo: $(STAMP)  ## the main job: tiny NEO, pretrain -> SFT -> ACPO on easy-vqa, on CPU
	$(BIN)/neo-jax demo

test: $(STAMP)  ## the default (fast) test suite
	$(BIN)/python -m pytest

test-all: $(STAMP)  ## everything, slow tests included
	$(BIN)/python -m pytest -m ""

clean:
	rm -rf $(VENV) workdir .pytest_cache
