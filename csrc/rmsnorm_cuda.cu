// CUDA kernels for RMSNorm (HF Llama semantics): the forward and the backward for x and weight. One block per row, fp32 accumulation (fp64 for fp64 inputs);
// the weight gradient is summed per block into a [blocks, H] buffer and reduced column-wise in a
// second kernel in a fixed order (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_utils.h"
#include "ops.h"

namespace preflexor {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) rms_forward_kernel(const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ w, scalar_t* __restrict__ y,
                                   acc_t<scalar_t>* __restrict__ rstd, int64_t H, acc_t<scalar_t> eps) {
  using A = acc_t<scalar_t>;
  __shared__ A sh[32];
  const int64_t r = blockIdx.x;
  const scalar_t* xr = x + r * H;
  scalar_t* yr = y + r * H;
  A acc = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const A v = static_cast<A>(xr[i]);
    acc += v * v;
  }
  acc = cuda::block_reduce(acc, cuda::SumOp<A>(), sh);
  const A s = A(1) / sqrt(acc / static_cast<A>(H) + eps);
  if (threadIdx.x == 0) rstd[r] = s;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const A n = static_cast<A>(static_cast<scalar_t>(static_cast<A>(xr[i]) * s));  // .to(x.dtype)
    yr[i] = static_cast<scalar_t>(static_cast<A>(w[i]) * n);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) rms_backward_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ w, const acc_t<scalar_t>* __restrict__ rstd,
                                    scalar_t* __restrict__ gx, acc_t<scalar_t>* __restrict__ partial, int64_t rows,
                                    int64_t H) {
  using A = acc_t<scalar_t>;
  __shared__ A sh[32];
  A* pw = partial + static_cast<int64_t>(blockIdx.x) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) pw[i] = 0;
  const A inv_h = A(1) / static_cast<A>(H);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* g = gy + r * H;
    const scalar_t* xr = x + r * H;
    const A s = rstd[r];
    A dot = 0;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      const A gv = static_cast<A>(g[i]);
      const A n = static_cast<A>(xr[i]) * s;
      dot += gv * static_cast<A>(w[i]) * n;
      pw[i] += gv * n;  // column i is owned by this thread
    }
    const A c = cuda::block_reduce(dot, cuda::SumOp<A>(), sh) * inv_h;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      const A n = static_cast<A>(xr[i]) * s;
      gx[r * H + i] = static_cast<scalar_t>(s * (static_cast<A>(g[i]) * static_cast<A>(w[i]) - n * c));
    }
  }
}

template <typename A>
__global__ void column_sum_kernel(const A* __restrict__ partial, A* __restrict__ out, int64_t nblocks, int64_t H) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= H) return;
  A acc = 0;
  for (int64_t b = 0; b < nblocks; ++b) acc += partial[b * H + i];
  out[i] = acc;
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), name, ": expected CUDA tensors");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, name, ": x must have a non-empty last dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), name, ": weight must have shape [", x.size(-1),
              "], got ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), name, ": x and weight must share a dtype");
  TORCH_CHECK(x.get_device() == weight.get_device(), name, ": x and weight must be on the same device");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                         double eps) {
  check_inputs(x_in, weight_in, "rms_norm");
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / H;
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc_dtype(x)));
  if (rows == 0) return {y, rstd};
  TORCH_CHECK(rows <= 0x7FFFFFFF, "rms_norm: too many rows for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cuda", [&] {
    using A = acc_t<scalar_t>;
    rms_forward_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rstd.data_ptr<A>(), H,
        static_cast<A>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& gy_in, const at::Tensor& x_in,
                                                          const at::Tensor& weight_in, const at::Tensor& rstd_in) {
  check_inputs(x_in, weight_in, "rms_norm_backward");
  TORCH_CHECK(gy_in.sizes() == x_in.sizes(), "rms_norm_backward: grad_y must have the shape of x");
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const int64_t H = x_in.size(-1), rows = x_in.numel() / H;
  TORCH_CHECK(rstd_in.scalar_type() == acc_dtype(x_in) && rstd_in.numel() == rows,
              "rms_norm_backward: rstd must hold one ", acc_dtype(x_in), " value per row");
  const at::Tensor gy = gy_in.to(x_in.scalar_type()).contiguous();
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor gx = at::empty_like(x);
  if (rows == 0) return {gx, at::zeros_like(weight)};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t nblocks = std::min<int64_t>(rows, static_cast<int64_t>(sms) * 4);
  at::Tensor partial = at::empty({nblocks, H}, x.options().dtype(acc_dtype(x)));
  at::Tensor gw = at::empty({H}, x.options().dtype(acc_dtype(x)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    rms_backward_kernel<scalar_t><<<static_cast<unsigned>(nblocks), kThreads, 0, stream>>>(
        gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), rstd.data_ptr<A>(),
        gx.data_ptr<scalar_t>(), partial.data_ptr<A>(), rows, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_sum_kernel<A><<<static_cast<unsigned>((H + 255) / 256), 256, 0, stream>>>(partial.data_ptr<A>(),
                                                                                     gw.data_ptr<A>(), nblocks, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gw.to(weight.scalar_type())};
}

}  // namespace preflexor
