// CUDA kernels for rotary position embeddings (HF rotate_half convention): out-of-place forward
// and its backward (the adjoint rotation). One thread per (b, h, t, i) pair
// of rotated elements (i < D/2); arbitrary strides with a contiguous head dimension; fp32 math.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"

namespace preflexor {
namespace {

struct RopeGeom {
  int64_t H, T, half;
  int64_t sb, sh, st;  // source strides
  int64_t db, dh, dt;  // destination strides
  int64_t cb, ct;      // cos strides (cb = 0 when cos is broadcast over batch)
  int64_t nb, nt;      // sin strides
};

template <typename T>
__global__ void rope_kernel(const T* src, T* dst, const T* __restrict__ cos, const T* __restrict__ sin, RopeGeom g,
                            int64_t total, bool transpose) {
  using A = acc_t<T>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t i = idx % g.half;
  int64_t rest = idx / g.half;
  const int64_t t = rest % g.T;
  rest /= g.T;
  const int64_t h = rest % g.H;
  const int64_t b = rest / g.H;
  const T* x = src + b * g.sb + h * g.sh + t * g.st;
  T* o = dst + b * g.db + h * g.dh + t * g.dt;
  const T* c = cos + b * g.cb + t * g.ct;
  const T* s = sin + b * g.nb + t * g.nt;
  const A x1 = static_cast<A>(x[i]), x2 = static_cast<A>(x[i + g.half]);
  const A c1 = static_cast<A>(c[i]), c2 = static_cast<A>(c[i + g.half]);
  const A s1 = static_cast<A>(s[i]), s2 = static_cast<A>(s[i + g.half]);
  if (!transpose) {
    o[i] = static_cast<T>(x1 * c1 - x2 * s1);
    o[i + g.half] = static_cast<T>(x2 * c2 + x1 * s2);
  } else {
    o[i] = static_cast<T>(x1 * c1 + x2 * s2);
    o[i + g.half] = static_cast<T>(x2 * c2 - x1 * s1);
  }
}

void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                const char* name) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && cos.is_cuda() && sin.is_cuda(), name, ": expected CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, name, ": q and k must be 4-D (B, H, T, D)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3), name,
              ": q and k must agree on B, T and D");
  TORCH_CHECK(q.size(3) % 2 == 0, name, ": head dim must be even");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == q.size(0) || cos.size(0) == 1) &&
                  cos.size(1) == q.size(2) && cos.size(2) == q.size(3),
              name, ": cos/sin must be (B or 1, T, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(),
              name, ": q, k, cos, sin must share a dtype");
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void launch(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
            bool transpose) {
  if (src.numel() == 0) return;
  RopeGeom g;
  g.H = src.size(1);
  g.T = src.size(2);
  g.half = src.size(3) / 2;
  g.sb = src.stride(0), g.sh = src.stride(1), g.st = src.stride(2);
  g.db = dst.stride(0), g.dh = dst.stride(1), g.dt = dst.stride(2);
  g.cb = cos.size(0) == 1 ? 0 : cos.stride(0), g.ct = cos.stride(1);
  g.nb = sin.size(0) == 1 ? 0 : sin.stride(0), g.nt = sin.stride(1);
  const int64_t total = src.numel() / 2;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  TORCH_CHECK(blocks <= 0x7FFFFFFF, "rope: tensor too large for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "rope_cuda", [&] {
    rope_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), g,
        total, transpose);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> out_of_place(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& cos_in, const at::Tensor& sin_in, bool transpose,
                                                const char* name) {
  check_rope(q_in, k_in, cos_in, sin_in, name);
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const at::Tensor cos = last_dim_contiguous(cos_in), sin = last_dim_contiguous(sin_in);
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  if (qo.stride(-1) != 1) qo = at::empty(q.sizes(), q.options());
  if (ko.stride(-1) != 1) ko = at::empty(k.sizes(), k.options());
  launch(q, qo, cos, sin, transpose);
  launch(k, ko, cos, sin, transpose);
  return {qo, ko};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin) {
  return out_of_place(q, k, cos, sin, false, "rope");
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                      const at::Tensor& cos, const at::Tensor& sin) {
  return out_of_place(grad_q, grad_k, cos, sin, true, "rope_backward");
}

}  // namespace preflexor
