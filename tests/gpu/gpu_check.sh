#!/usr/bin/env bash
# make gpu-check: the whole CUDA check in one run, under 8 minutes (fits a 15-minute device budget with
# the machine's start and one rerun of a part).
#
#   1. CUDA must be visible to torch (else: message, exit 2).
#   2. Build the compiled extension in place (setup.py build_ext --inplace, ninja) for this card's
#      architecture only, capped at BUILD_CAP_S -> $OUT/build.log with the measured build time.
#      A failed build is reported, the run goes on (the torch fallbacks then run and the csrc CUDA
#      checks skip).
#   3. python -m pytest tests/gpu -> $OUT/gpu-tests.xml (junit).
#   4. The GPU benchmarks (tests/benchmarks, marker "gpu"; the retrieval benchmarks are left out:
#      hnswlib may be absent) -> $OUT/bench.json (pytest-benchmark).
#   5. tests/gpu/summarize.py prints a table and writes $OUT/gpu_check.json (card, driver, torch,
#      triton, date, build, test counts, each benchmark's mean time and extra_info numbers).
#
# Usage:  bash tests/gpu/gpu_check.sh          (from anywhere; runs in the repository root)
# Env:    OUT (default tests/benchmarks/results/latest), PYTHON (default python3),
#         GPU_CHECK_BUDGET_S (default 420: total seconds for steps 2-4; each step also has its own cap),
#         BUILD_CAP_S (200), BUILD_RESERVE_S (220: budget seconds the build leaves to what follows).
# Exit:   0 all passed, 1 something failed or timed out, 2 no CUDA.
# The package is used from the working tree (PYTHONPATH=repo root). Nothing is pip-installed, except
# ninja when it is missing and an index answers within 30 s.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-tests/benchmarks/results/latest}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# tests/conftest.py defaults TRITON_INTERPRET to 1 (CPU suite); on the GPU the kernels must compile.
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1

# ----------------------------------------------------------------------------- 1. CUDA
if ! cuda_msg=$("$PY" - <<'EOF' 2>&1
import sys
try:
    import torch
except Exception as e:
    print(f"torch does not import ({e})"); sys.exit(1)
if torch.version.cuda is None:
    print(f"torch {torch.__version__} is a CPU-only build"); sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"); sys.exit(1)
major, minor = torch.cuda.get_device_capability()
print(f"{torch.cuda.get_device_name()} sm_{major}{minor} arch={major}.{minor}")
EOF
); then
    echo "gpu-check needs CUDA: $(echo "$cuda_msg" | tail -n 1)." >&2
    echo "Run it on a machine with an NVIDIA GPU and a CUDA build of torch (PYTHON=$PY)." >&2
    exit 2
fi
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
echo "== gpu-check on ${cuda_msg%% arch=*}; results -> $OUT"
ARCH=${cuda_msg##*arch=}
: > "$OUT/steps.tsv"
START=$SECONDS

remaining() { echo $(( BUDGET - (SECONDS - START) )); }

# run_step NAME CAP_S CMD...: run CMD under min(CAP_S, what is left of the budget minus RESERVE_S);
# SIGINT first (pytest then still writes its junit / benchmark files), SIGKILL 10 s later.
# Appends "NAME rc seconds limit" to $OUT/steps.tsv.
RESERVE_S=0
run_step() {
    local name=$1 cap=$2; shift 2
    local left=$(( $(remaining) - RESERVE_S ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        echo "-- $name: skipped, the time budget is spent" >&2
        printf '%s\t%s\t%s\t%s\n' "$name" 124 0 0 >> "$OUT/steps.tsv"
        return 124
    fi
    echo "-- $name (limit ${limit}s)"
    local t0=$SECONDS rc
    timeout -s INT -k 10 "$limit" "$@"
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(( SECONDS - t0 )) "$limit" >> "$OUT/steps.tsv"
    (( rc == 124 || rc == 137 )) && echo "-- $name: timed out after ${limit}s" >&2
    return $rc
}

# ----------------------------------------------------------------------------- 2. build
# This card's architecture only (one nvcc pass per .cu instead of two) and ninja, so the sources compile
# in parallel (MAX_JOBS): on 2 loaded cores each .cu took 108-155 s with nvcc, one after another
# without ninja. The build is capped at BUILD_CAP_S (default 200 s) inside the budget, leaving
# BUILD_RESERVE_S (220 s) of it to the tests and the smoke run.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! command -v ninja >/dev/null; then
    NINJA_DIR=$("$PY" -c "import ninja, os; print(ninja.BIN_DIR)" 2>/dev/null) || \
        { timeout 30 "$PY" -m pip install -q --retries 0 --timeout 5 ninja >/dev/null 2>&1 && \
          NINJA_DIR=$("$PY" -c "import ninja; print(ninja.BIN_DIR)" 2>/dev/null); } || NINJA_DIR=
    [[ -n $NINJA_DIR ]] && export PATH="$NINJA_DIR:$PATH"
fi
{ command -v nvcc >/dev/null && nvcc --version | tail -n 2
  if command -v ninja >/dev/null; then echo "ninja $(ninja --version), MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST"
  else echo "note: ninja not found (nor pip-installable), torch builds the sources one after another"; fi
} > "$OUT/build.log" 2>&1
head -n 3 "$OUT/build.log" | sed 's/^/   /'
RESERVE_S=${BUILD_RESERVE_S:-220}   # keep room for the tests and the smoke run
build_t0=$SECONDS
run_step build "${BUILD_CAP_S:-200}" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
build_rc=$?
build_s=$(( SECONDS - build_t0 ))
echo "build: ${build_s} s" >> "$OUT/build.log"
if (( build_rc == 0 )); then echo "   build ok in ${build_s} s"
else echo "   build FAILED (rc $build_rc) after ${build_s} s, see $OUT/build.log" >&2; fi

# ----------------------------------------------------------------------------- 3. tests/gpu
# Per-test limit when pytest-timeout is loaded (a hung kernel then fails one test, not the step).
HAVE_PYTEST_TIMEOUT=0
if "$PY" -m pytest --help 2>/dev/null | grep -q -- '--timeout='; then HAVE_PYTEST_TIMEOUT=1; fi
TIMEOUT_ARGS=()
(( HAVE_PYTEST_TIMEOUT )) && TIMEOUT_ARGS=(--timeout=120)
RESERVE_S=140   # keep room for the benchmarks
run_step tests 120 "$PY" -m pytest -q tests/gpu -p no:cacheprovider -rfEs ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"

# ----------------------------------------------------------------------------- 3b. real-model training smoke
# One ORPO + one EXO step on llama-3.2-3b (random bf16, LoRA r=16, Triton, packed, checkpointing).
run_step train_smoke 150 "$PY" tests/gpu/smoke_train.py --out "$OUT" 2>&1 | tee "$OUT/train-smoke.log"

# ----------------------------------------------------------------------------- 4. benchmarks
# The most important first (a timeout cuts the tail); retrieval is left out (hnswlib).
BENCH_FILES=()
for f in tests/benchmarks/test_bench_{trainer,kernels,ops,sampler}.py tests/benchmarks/test_bench_*.py; do
    [[ -f $f && $f != *test_bench_retrieval.py && " ${BENCH_FILES[*]} " != *" $f "* ]] && BENCH_FILES+=("$f")
done
BENCH_TIMEOUT=()
(( HAVE_PYTEST_TIMEOUT )) && BENCH_TIMEOUT=(--timeout=150)
RESERVE_S=0
run_step benchmarks 300 "$PY" -m pytest -q "${BENCH_FILES[@]}" -m gpu --benchmark-only \
    --continue-on-collection-errors -p no:cacheprovider -rfEs ${BENCH_TIMEOUT[@]+"${BENCH_TIMEOUT[@]}"} \
    --benchmark-json="$OUT/bench.json" --junitxml="$OUT/bench-tests.xml" 2>&1 | tee "$OUT/bench.log"

# ----------------------------------------------------------------------------- 5. summary
"$PY" tests/gpu/summarize.py --out "$OUT" --steps "$OUT/steps.tsv" --build-log "$OUT/build.log" \
    --tests "$OUT/gpu-tests.xml" --bench-tests "$OUT/bench-tests.xml" --bench "$OUT/bench.json" \
    --train-smoke "$OUT/train_smoke.json" \
    --elapsed $(( SECONDS - START ))
