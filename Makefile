# make demo: the main job end to end on the offline flower data. make test: the test suite.
# Both create .venv and install the project on a fresh machine with no other step.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUNS ?= runs

.PHONY: install keras-cache demo test test-fast lint clean container-test peers-env bench-peers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[train,export,dev,deploy,lite]"
	touch $(STAMP)

install: $(STAMP)

keras-cache:
	@bash scripts/keras_cache.sh

demo: install keras-cache
	$(BIN)/python scripts/demo.py --runs $(RUNS)

test: install keras-cache
	$(BIN)/pytest -q -ra

test-fast: install keras-cache
	$(BIN)/pytest -q -ra -m "not slow"

lint: install
	$(BIN)/ruff check .

# Build the image with buildah from the Dockerfile and serve a tiny model in it (root; docs/deployment.md, Container test).
container-test: install
	bash scripts/container_test.sh

# Benchmark peers (Triton through nvidia-pytriton, perf_analyzer) in their own .venv-peers, never in .venv;
# bench-peers runs imgcls and Triton side by side on the demo's flower model (docs/benchmarks.md, 2026-11-29).
peers-env:
	bash scripts/peers_env.sh

bench-peers: install peers-env
	$(BIN)/python benchmarks/bench_peers.py --model-repository $(RUNS)/repo --model flowers \
	  --images $(HOME)/.keras/datasets/flower_photos --duration 10 --json $(RUNS)/bench_peers.json

clean:
	rm -rf $(RUNS) .pytest_cache
