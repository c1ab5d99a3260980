#!/usr/bin/env bash
# make cuda-compile-check: compile csrc/*.cu for sm_90 (or CUDA_ARCH) with no GPU and no system CUDA.
#
# nvcc comes from PyPI: the CUDA 13 wheels nvidia-cuda-nvcc (nvcc, ptxas), nvidia-nvvm (cicc),
# nvidia-cuda-crt (crt/ headers), nvidia-cuda-runtime and nvidia-cuda-cccl, installed once into
# build/cuda-nvcc (the CUDA 12 nvcc wheels ship no nvcc binary). torch's CPU wheels carry the c10/cuda
# and ATen/cuda headers but not c10/cuda/impl/cuda_cmake_macros.h, which CMake generates in a CUDA
# build; a minimal one is written to a temporary include directory. Each .cu is compiled to an object
# (-c, nothing linked), so this checks that the sources compile against the installed torch.
# Usage: bash tests/gpu/cuda_compile_check.sh   Env: PYTHON (default .venv/bin/python), CUDA_ARCH (90),
#        NVCC_DIR (build/cuda-nvcc), JOBS (parallel nvcc processes, default 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-.venv/bin/python}
ARCH=${CUDA_ARCH:-90}
NVCC_DIR=${NVCC_DIR:-build/cuda-nvcc}
JOBS=${JOBS:-2}
CU13=$NVCC_DIR/nvidia/cu13

if [[ ! -x $CU13/bin/nvcc || ! -x $CU13/nvvm/bin/cicc || ! -f $CU13/include/crt/host_config.h ]]; then
    echo "-- installing nvcc (CUDA 13, PyPI) into $NVCC_DIR"
    "$PY" -m pip install -q --upgrade --target "$NVCC_DIR" --no-deps "nvidia-cuda-nvcc==13.*" "nvidia-nvvm==13.*" \
        "nvidia-cuda-crt==13.*" "nvidia-cuda-runtime==13.*" "nvidia-cuda-cccl==13.*" 2>&1 | grep -v "^WARNING" || true
fi
NVCC=$CU13/bin/nvcc
"$NVCC" --version | tail -n 2

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/include/c10/cuda/impl"
cat > "$TMP/include/c10/cuda/impl/cuda_cmake_macros.h" <<'EOF'
#pragma once
// Written by the compile check: CPU builds of torch do not ship this CMake-generated header.
#define C10_CUDA_BUILD_SHARED_LIBS
EOF

mapfile -t TORCH_INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CXX_STD=$("$PY" -c "import torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print('c++20' if v >= (2, 10) else 'c++17')")
FLAGS=(-c -std="$CXX_STD" -O3 -gencode "arch=compute_${ARCH},code=sm_${ARCH}" --expt-relaxed-constexpr
       -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D__CUDA_NO_HALF_OPERATORS__
       -DPREFLEXOR_WITH_CUDA -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -I"$TMP/include" -I"$CU13/include" -I"$PY_INC" -Icsrc)
for inc in "${TORCH_INC[@]}"; do FLAGS+=(-I"$inc"); done

compile() {
    local src=$1 t0=$SECONDS
    if "$NVCC" "${FLAGS[@]}" "$src" -o "$TMP/$(basename "$src").o" > "$TMP/$(basename "$src").log" 2>&1; then
        echo "ok   $src ($(( SECONDS - t0 )) s)"
    else
        echo "FAIL $src ($(( SECONDS - t0 )) s)"; tail -n 30 "$TMP/$(basename "$src").log"; return 1
    fi
}
START=$SECONDS
rc=0
for src in csrc/*.cu; do
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || rc=1; done
    compile "$src" &
done
while (( $(jobs -rp | wc -l) > 0 )); do wait -n || rc=1; done
echo "csrc/*.cu for sm_${ARCH}: $( ((rc == 0)) && echo ok || echo FAILED ) in $(( SECONDS - START )) s (nvcc, $JOBS at a time)"
exit $rc
