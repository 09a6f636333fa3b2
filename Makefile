# Set-up is part of every target: a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
PROTOS := herd/protos/herd/v1/experts_pb2.py

.PHONY: venv protos serve test lint image image-test gpu-check clean

venv: $(STAMP)

# Reinstall whenever the dependency list changes.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Generated gRPC code: made from protos/ here, never edited (and not committed).
protos: $(PROTOS)
$(PROTOS): $(STAMP) $(wildcard protos/herd/v1/*.proto) protos/generate.py
	$(BIN)/python protos/generate.py

# The main job: local Ray, the tiny Scout (made on first use) with 2 expert shards, HTTP :8000, gRPC :50051.
serve: $(STAMP) $(PROTOS)
	$(BIN)/herd serve

lint: $(STAMP) $(PROTOS)
	$(BIN)/ruff check herd tests bench protos herd_loadgen
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# The container image, herd:<version>-<flavour> (FLAVOR=cpu or cuda; IMAGE=, BASE=, ENGINE= override): docker when its
# daemon answers, else buildah (Containerfile, containers/build.sh). No venv needed.
image:
	bash containers/build.sh

# Opt-in, minutes, needs buildah, podman, runc and debootstrap: builds the CPU image, runs herd serve in it, then
# the dev profile's pods (make-tiny, Ray head and worker, Serve, gateway) from it as KubeRay would.
image-test: $(STAMP) $(PROTOS)
	$(BIN)/python -m pytest -q -s -m image tests/integration/test_image.py tests/integration/test_image_chart.py

# On a CUDA machine: every CuPy kernel and a whole MoE layer against torch, then timed. Needs only
# PyTorch and CuPy (the GPU machines have nothing else), so it uses the system python, not .venv.
gpu-check:
	PYTHONPATH=. $(PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) .herd herd/protos/herd
