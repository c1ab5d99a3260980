// Declarations shared by the preflexor extension: the CPU implementations (rmsnorm_cpu.cpp,
// rope_cpu.cpp, sampling_cpu.cpp), the CUDA implementations (*_cuda.cu, built only with
// PREFLEXOR_WITH_CUDA) and the small fp32 conversion helpers used by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <tuple>

namespace preflexor {

// ---------------------------------------------------------------------------------- CPU
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                        double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd);

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                     const at::Tensor& cos, const at::Tensor& sin);

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, const at::Tensor& seeds);

at::Tensor decode_matmul_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor decode_step_cpu(const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& cos, const at::Tensor& sin,
                           at::TensorList norms, at::TensorList mats, at::TensorList scales, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, int64_t n_heads, int64_t n_kv_heads, double eps);

#ifdef PREFLEXOR_WITH_CUDA
// --------------------------------------------------------------------------------- CUDA
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                         double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd);

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                      const at::Tensor& cos, const at::Tensor& sin);

at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& seeds);
#endif

// ------------------------------------------------------------ element conversions (CPU)
// Plain inline conversions so the compiler can vectorise the loops; rounding matches
// c10 (round to nearest even, NaN kept as NaN).
template <typename T>
inline float to_f32(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_f32(float v) { return static_cast<T>(v); }

template <>
inline float to_f32<c10::BFloat16>(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  c10::BFloat16 out;
  if (f != f) {
    out.x = 0x7FC0;
  } else {
    u += 0x7FFFu + ((u >> 16) & 1u);
    out.x = static_cast<uint16_t>(u >> 16);
  }
  return out;
}

// Accumulation type: fp32 for fp32 / bf16 / fp16, fp64 for fp64 (so fp64 gradchecks are exact).
template <typename T>
struct AccT { using type = float; };
template <>
struct AccT<double> { using type = double; };
template <typename T>
using acc_t = typename AccT<T>::type;

template <typename T>
inline acc_t<T> to_acc(T v) { return to_f32(v); }
template <>
inline double to_acc<double>(double v) { return v; }

template <typename T>
inline T from_acc(acc_t<T> v) { return from_f32<T>(v); }
template <>
inline double from_acc<double>(double v) { return v; }

// splitmix64: the counter-based generator behind `sample` (CPU and CUDA share the constants).
C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform double in [0, 1) for (seed, row): 53 random bits of splitmix64(splitmix64(seed) ^ row).
C10_HOST_DEVICE inline double uniform_for(int64_t seed, int64_t row) {
  uint64_t h = splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(row));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace preflexor
