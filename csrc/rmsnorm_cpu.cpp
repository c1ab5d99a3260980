// CPU kernels for RMSNorm (HF Llama semantics): the forward and the backward for x and weight. fp32 accumulation for every dtype; rows run in parallel
// through at::parallel_for (OpenMP), the hidden dimension is a `#pragma omp simd` loop, compiled for each ISA
// path (cpu_isa.h: AVX-512, AVX2 + FMA, portable) and run on the active one.
// fp64 inputs are computed in fp64 (rstd is then fp64) so that fp64 gradchecks are meaningful.
//
//   y = weight * (x_f32 * rstd).to(x.dtype),   rstd = 1 / sqrt(mean(x_f32^2) + eps)   (per row)
//   grad_x = rstd * (g - n * mean(g * n)),  g = grad_y * weight,  n = x_f32 * rstd
//   grad_weight = sum_rows(grad_y * n)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "cpu_isa.h"
#include "ops.h"

namespace preflexor {
namespace {

// rstd and the weight-gradient partials are fp64 for fp64 inputs, fp32 otherwise.
at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.dim() >= 1, name, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), name, ": weight must have shape [",
              x.size(-1), "] (the last dim of x), got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), name, ": x and weight must share a dtype, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), name, ": x and weight must be on the same device");
  TORCH_CHECK(x.size(-1) > 0, name, ": the normalised dimension must be non-empty");
}

// Normalises rows [begin, end) of `src` (hidden H) into `y`; writes rstd. Compiled once per ISA path.
template <typename scalar_t>
PREFLEXOR_ALWAYS_INLINE void rms_forward_range(const scalar_t* src, const scalar_t* w, scalar_t* y,
                                               acc_t<scalar_t>* rstd, int64_t begin, int64_t end, int64_t H,
                                               acc_t<scalar_t> eps) {
  using A = acc_t<scalar_t>;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = src + r * H;
      scalar_t* yr = y + r * H;
      A acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < H; ++i) {
        const A v = to_acc(xr[i]);
        acc += v * v;
      }
      const A s = A(1) / std::sqrt(acc / static_cast<A>(H) + eps);
      rstd[r] = s;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        const A n = to_acc(from_acc<scalar_t>(to_acc(xr[i]) * s));  // .to(x.dtype) as in HF
        yr[i] = from_acc<scalar_t>(to_acc(w[i]) * n);
      }
    }
}
PREFLEXOR_ISA_VARIANTS(rms_forward_range_isa, rms_forward_range)

template <typename scalar_t>
void rms_forward_rows(const scalar_t* src, const scalar_t* w, scalar_t* y, acc_t<scalar_t>* rstd, int64_t rows,
                      int64_t H, double eps_d) {
  const acc_t<scalar_t> eps = static_cast<acc_t<scalar_t>>(eps_d);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    rms_forward_range_isa<scalar_t>(src, w, y, rstd, begin, end, H, eps);
  });
}

// grad_x of the rows of blocks [b0, b1) and each block's grad_weight partial. Compiled once per ISA path.
template <typename scalar_t>
PREFLEXOR_ALWAYS_INLINE void rms_backward_blocks(const scalar_t* gyp, const scalar_t* xp, const scalar_t* wp,
                                                 const acc_t<scalar_t>* sp, scalar_t* gxp, acc_t<scalar_t>* pp,
                                                 int64_t rows, int64_t H, int64_t kBlock, int64_t b0, int64_t b1) {
  using A = acc_t<scalar_t>;
  const A inv_h = A(1) / static_cast<A>(H);
    for (int64_t b = b0; b < b1; ++b) {
      A* acc_w = pp + b * H;
      const int64_t r_end = std::min(rows, (b + 1) * kBlock);
      for (int64_t r = b * kBlock; r < r_end; ++r) {
        const scalar_t* g = gyp + r * H;
        const scalar_t* xr = xp + r * H;
        scalar_t* out = gxp + r * H;
        const A s = sp[r];
        A dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < H; ++i) {
          const A gv = to_acc(g[i]);
          const A n = to_acc(xr[i]) * s;
          dot += gv * to_acc(wp[i]) * n;
          acc_w[i] += gv * n;
        }
        const A c = dot * inv_h;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) {
          const A n = to_acc(xr[i]) * s;
          out[i] = from_acc<scalar_t>(s * (to_acc(g[i]) * to_acc(wp[i]) - n * c));
        }
      }
    }
}
PREFLEXOR_ISA_VARIANTS(rms_backward_blocks_isa, rms_backward_blocks)

template <typename scalar_t>
void rms_backward_rows(const scalar_t* gyp, const scalar_t* xp, const scalar_t* wp, const acc_t<scalar_t>* sp,
                       scalar_t* gxp, acc_t<scalar_t>* pp, acc_t<scalar_t>* gw, int64_t rows, int64_t H,
                       int64_t kBlock) {
  using A = acc_t<scalar_t>;
  const int64_t nblocks = (rows + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    rms_backward_blocks_isa<scalar_t>(gyp, xp, wp, sp, gxp, pp, rows, H, kBlock, b0, b1);
  });
  at::parallel_for(0, H, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      A acc = 0;
      for (int64_t b = 0; b < nblocks; ++b) acc += pp[b * H + i];
      gw[i] = acc;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                        double eps) {
  check_inputs(x_in, weight_in, "rms_norm");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t H = x.size(-1);
  const int64_t rows = x.numel() / H;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc_dtype(x)));
  if (rows == 0) return {y, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cpu", [&] {
    rms_forward_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                               rstd.data_ptr<acc_t<scalar_t>>(), rows, H, eps);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& gy_in, const at::Tensor& x_in,
                                                         const at::Tensor& weight_in, const at::Tensor& rstd_in) {
  check_inputs(x_in, weight_in, "rms_norm_backward");
  TORCH_CHECK(gy_in.sizes() == x_in.sizes(), "rms_norm_backward: grad_y must have the shape of x, got ",
              gy_in.sizes(), " and ", x_in.sizes());
  const int64_t H = x_in.size(-1);
  const int64_t rows = x_in.numel() / H;
  TORCH_CHECK(rstd_in.scalar_type() == acc_dtype(x_in) && rstd_in.numel() == rows,
              "rms_norm_backward: rstd must be ", acc_dtype(x_in), " with one value per row (", rows, "), got ",
              rstd_in.scalar_type(), " with ", rstd_in.numel(), " values");
  const at::Tensor gy = gy_in.to(x_in.scalar_type()).contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor gx = at::empty_like(x);
  if (rows == 0) return {gx, at::zeros_like(weight)};

  // Rows are cut into fixed blocks; each block sums its grad_weight contribution in fp32 and the
  // blocks are added in order afterwards, so the result does not depend on the thread count.
  constexpr int64_t kBlock = 64;
  const int64_t nblocks = (rows + kBlock - 1) / kBlock;
  at::Tensor partial = at::zeros({nblocks, H}, x.options().dtype(acc_dtype(x)));
  at::Tensor gw_f = at::empty({H}, x.options().dtype(acc_dtype(x)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward_cpu", [&] {
    rms_backward_rows<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                rstd.data_ptr<acc_t<scalar_t>>(), gx.data_ptr<scalar_t>(),
                                partial.data_ptr<acc_t<scalar_t>>(), gw_f.data_ptr<acc_t<scalar_t>>(), rows, H, kBlock);
  });
  return {gx, gw_f.to(weight.scalar_type())};
}

}  // namespace preflexor
