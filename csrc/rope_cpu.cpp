// CPU kernels for rotary position embeddings in the HF "rotate_half" convention:
//   out = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x2, x1)
// applied to q (B, Hq, T, D) and k (B, Hkv, T, D) with cos/sin (B or 1, T, D).
// Defines the out-of-place forward, its backward (the transpose of the rotation, which equals
// rope with -sin when the two halves of sin are equal, as HF builds them).
// Any strides are accepted as long as the head dimension is contiguous; compute is fp32. The row loop is
// compiled for each ISA path (cpu_isa.h) and runs on the active one.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu_isa.h"
#include "ops.h"

namespace preflexor {
namespace {

void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                const char* name) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, name, ": q and k must be 4-D (B, H, T, D), got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3), name,
              ": q and k must agree on B, T and D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(3) % 2 == 0, name, ": head dim must be even, got ", q.size(3));
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes(), name, ": cos and sin must be (B, T, D) and equal, got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK((cos.size(0) == q.size(0) || cos.size(0) == 1) && cos.size(1) == q.size(2) && cos.size(2) == q.size(3),
              name, ": cos/sin shape ", cos.sizes(), " does not fit q ", q.sizes(), " (want (B or 1, T, D))");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(),
              name, ": q, k, cos, sin must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              cos.scalar_type(), ", ", sin.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == cos.device() && q.device() == sin.device(), name,
              ": q, k, cos, sin must be on one device");
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Rows [begin, end) of the (B, H, T) rows; `transpose` applies the adjoint rotation (the backward).
struct RopeArgs {
  int64_t H, Tn, half;
  int64_t sb, sh, st, db, dh, dt, cb, ct, nb, nt;
  bool transpose;
};

template <typename T>
PREFLEXOR_ALWAYS_INLINE void rope_rows(const T* sp, T* dp, const T* cp, const T* np, const RopeArgs* a,
                                       int64_t begin, int64_t end) {
  const int64_t half = a->half;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % a->Tn, h = (row / a->Tn) % a->H, b = row / (a->Tn * a->H);
      const T* x = sp + b * a->sb + h * a->sh + t * a->st;
      T* o = dp + b * a->db + h * a->dh + t * a->dt;
      const T* c = cp + b * a->cb + t * a->ct;
      const T* s = np + b * a->nb + t * a->nt;
      if (!a->transpose) {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const auto x1 = to_acc(x[i]), x2 = to_acc(x[i + half]);
          o[i] = from_acc<T>(x1 * to_acc(c[i]) - x2 * to_acc(s[i]));
          o[i + half] = from_acc<T>(x2 * to_acc(c[i + half]) + x1 * to_acc(s[i + half]));
        }
      } else {
        // adjoint: g1' = g1*c1 + g2*s2,  g2' = g2*c2 - g1*s1
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const auto x1 = to_acc(x[i]), x2 = to_acc(x[i + half]);
          o[i] = from_acc<T>(x1 * to_acc(c[i]) + x2 * to_acc(s[i + half]));
          o[i + half] = from_acc<T>(x2 * to_acc(c[i + half]) - x1 * to_acc(s[i]));
        }
      }
    }
}
PREFLEXOR_ISA_VARIANTS(rope_rows_isa, rope_rows)

template <typename T>
void rope_apply(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& cos, const at::Tensor& sin,
                bool transpose) {
  const int64_t B = src.size(0), H = src.size(1), Tn = src.size(2), D = src.size(3);
  if (src.numel() == 0) return;
  const RopeArgs a{H, Tn, D / 2,
                   src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
                   cos.size(0) == 1 ? 0 : cos.stride(0), cos.stride(1), sin.size(0) == 1 ? 0 : sin.stride(0),
                   sin.stride(1), transpose};
  const T* sp = src.data_ptr<T>();
  T* dp = dst.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* np = sin.data_ptr<T>();
  at::parallel_for(0, B * H * Tn, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    rope_rows_isa<T>(sp, dp, cp, np, &a, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> rope_out_of_place(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& cos_in, const at::Tensor& sin_in,
                                                     bool transpose, const char* name) {
  check_rope(q_in, k_in, cos_in, sin_in, name);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const at::Tensor cos = last_dim_contiguous(cos_in), sin = last_dim_contiguous(sin_in);
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  if (qo.stride(-1) != 1) qo = at::empty(q.sizes(), q.options());
  if (ko.stride(-1) != 1) ko = at::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cpu", [&] {
    rope_apply<scalar_t>(q, qo, cos, sin, transpose);
    rope_apply<scalar_t>(k, ko, cos, sin, transpose);
  });
  return {qo, ko};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin) {
  return rope_out_of_place(q, k, cos, sin, /*transpose=*/false, "rope");
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                     const at::Tensor& cos, const at::Tensor& sin) {
  return rope_out_of_place(grad_q, grad_k, cos, sin, /*transpose=*/true, "rope_backward");
}

}  // namespace preflexor
