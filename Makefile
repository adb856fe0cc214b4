# Quick start: `make demo` runs the main job, `make test` runs the whole suite.
# Each target sets up .venv by itself (torch's CPU wheel first, so that pip does not
# pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: venv demo test lint bench bench-fetch proto clean

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" -e "clients/python[torch]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m weightd.demo

test: venv
	$(BIN)/ruff check weightd clients/python bench tests
	$(BIN)/mypy weightd clients/python/weightd_client clients/python/weightd_errors
	$(BIN)/pytest -q

bench-fetch: venv
	$(BIN)/python bench/fetch.py

# The peers the cold-start benchmark compares against (run:ai streamer, fastsafetensors)
# and matplotlib for its plots: only for `make bench`.
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python bench/cold_start.py

proto: venv
	$(BIN)/python -m weightd.proto_gen

clean:
	rm -rf $(VENV) build *.egg-info
