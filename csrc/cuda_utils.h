// Device helpers shared by the preflexor CUDA kernels (included only from the .cu files): warp/block
// reductions and a block-wide exclusive scan. Every reduction combines partial results in a fixed
// order, so results are deterministic run to run. Block sizes must be multiples of 32 (at most 1024).
#pragma once

#include <cuda_runtime.h>

namespace preflexor {
namespace cuda {

template <typename T>
struct SumOp {
  __device__ T operator()(T a, T b) const { return a + b; }
};
template <typename T>
struct MaxOp {
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
template <typename T>
struct MinOp {
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Reduces `v` over the block; every thread gets the result. `sh` holds at least 32 T.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* sh) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // `sh` may still be read from a previous call
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  T r = sh[0];
  for (int w = 1; w < nw; ++w) r = op(r, sh[w]);
  return r;
}

// Exclusive prefix sum of `v` over threads in thread order; `sh` holds blockDim.x T.
// Returns this thread's exclusive prefix and writes the block total to *total (every thread).
template <typename T>
__device__ T block_exclusive_scan(T v, T* sh, T* total) {
  __syncthreads();
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int off = 1; off < static_cast<int>(blockDim.x); off <<= 1) {
    const T add = static_cast<int>(threadIdx.x) >= off ? sh[threadIdx.x - off] : T(0);
    __syncthreads();
    sh[threadIdx.x] += add;
    __syncthreads();
  }
  *total = sh[blockDim.x - 1];
  return threadIdx.x > 0 ? sh[threadIdx.x - 1] : T(0);
}

}  // namespace cuda
}  // namespace preflexor
