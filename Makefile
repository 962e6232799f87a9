# trmrl -- one entry point for the common jobs. Every target sets up .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export MUJOCO_GL ?= disable

.PHONY: help venv demo test lint typecheck pytest fast-test test-under-load reliability format clean docker-build \
	docker-smoke docker-build-gpu gpu-bench gpu-bench-smoke gpu-wheels

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): pyproject.toml clients/pyproject.toml clients/sim/pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements/constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e './clients[stream]' -e './clients/sim[render]' -e '.[dev]'
	# openpi-client (tests of the openpi-compatible endpoint) pins numpy<2 without needing it.
	$(PY) -m pip install --quiet --no-deps openpi-client==0.1.2
	touch $(STAMP)

venv: $(STAMP)  ## create .venv with pinned dependencies (CPU torch)

demo: $(STAMP)  ## the main job: serve the bundled TrMRL checkpoint and its references, run held-out tasks through it
	$(PY) -m trmrl_sim.demo

test: lint typecheck pytest  ## everything CI runs: lint, type checks, all tests

lint: $(STAMP)  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)  ## mypy over the packages
	$(VENV)/bin/mypy

pytest: $(STAMP)  ## all tests
	$(PY) -m pytest

fast-test: $(STAMP)  ## tests without the slow marker
	$(PY) -m pytest -m "not slow"

HOGS ?= 2
test-under-load: $(STAMP)  ## all tests with $(HOGS) busy processes beside them (a loaded CI machine)
	@hogs=(); trap 'kill $${hogs[*]} 2>/dev/null' EXIT; \
	for _ in $$(seq $(HOGS)); do $(PY) -c 'while True: pass' & hogs+=($$!); done; \
	echo "test-under-load: $(HOGS) busy processes beside the tests, $$(nproc) CPUs"; \
	start=$$SECONDS; status=0; $(PY) -m pytest || status=$$?; \
	echo "test-under-load: pytest exited with $$status after $$((SECONDS - start)) s"; exit $$status

reliability: $(STAMP)  ## full fuzz, 10-min soak, SIGKILL and security runs (TRMRL_LONG=1)
	TRMRL_LONG=1 $(PY) -m pytest tests/reliability -s

gpu-bench: $(STAMP)  ## GPU benchmark (one GPU, ~16 cores, < 8 min): model side, service end to end, trainer; docs/performance.md
	$(PY) -m bench.gpu_bench --json bench/results/gpu_bench.json

gpu-wheels:  ## the Python 3.12 wheels gpu-bench needs on a GPU box with no registry, into .whl/
	bench/gpu_wheels.sh .whl

gpu-bench-smoke: $(STAMP)  ## the GPU benchmark shrunk to run on a CPU (checks the script; measures no GPU)
	$(PY) -m bench.gpu_bench --cpu-smoke --json /tmp/gpu_bench_smoke.json

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

docker-build:  ## build the CPU images (base by debootstrap, torch from docker/wheelhouse) and Prometheus; see docs/deploy.md
	docker/make-base-image.sh
	ls docker/wheelhouse/torch-*+cpu-*.whl >/dev/null 2>&1 || cp /opt/wheels/torch-2.13.0+cpu-cp311-*.whl docker/wheelhouse/
	for c in /usr/local/share/ca-certificates/*.crt; do [ ! -f "$$c" ] || cp "$$c" docker/certs/; done
	DOCKER_BUILDKIT=0 docker build -f docker/service.Dockerfile -t trmrl/service:cpu \
		--build-arg BASE_IMAGE=trmrl/debian-python:bookworm \
		--build-arg TORCH_PIP_ARGS="--no-deps --no-index --find-links /wheelhouse" .
	DOCKER_BUILDKIT=0 docker build -f docker/trainer.Dockerfile -t trmrl/trainer:cpu --build-arg SERVICE_IMAGE=trmrl/service:cpu .
	DOCKER_BUILDKIT=0 docker build -f docker/router.Dockerfile -t trmrl/router:local \
		--build-arg BASE_IMAGE=trmrl/debian-python:bookworm .
	DOCKER_BUILDKIT=0 docker build -f docker/prometheus.Dockerfile -t trmrl/prometheus:local \
		--build-arg BASE_IMAGE=trmrl/debian-python:bookworm .

docker-build-gpu:  ## build the GPU images without a registry: the debootstrapped Debian base, PyPI's CUDA torch (several GB)
	docker/make-base-image.sh
	for c in /usr/local/share/ca-certificates/*.crt; do [ ! -f "$$c" ] || cp "$$c" docker/certs/; done
	DOCKER_BUILDKIT=0 docker build -f docker/service.Dockerfile -t trmrl/service:cuda \
		--build-arg BASE_IMAGE=trmrl/debian-python:bookworm --build-arg TORCH_WHEELHOUSE=docker/wheelhouse/README.md .
	DOCKER_BUILDKIT=0 docker build -f docker/trainer.Dockerfile -t trmrl/trainer:cuda --build-arg SERVICE_IMAGE=trmrl/service:cuda .
	docker image ls trmrl/service:cuda

docker-smoke: $(STAMP)  ## build the images and run the deployment for real: the CUDA image on CPU, compose, restart, 2 replicas, Prometheus, a killed one
	docker/smoke.sh
