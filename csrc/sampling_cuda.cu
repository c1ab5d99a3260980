// CUDA kernel for token sampling with per-row temperature / top-k / top-p (same semantics as
// sampling_cpu.cpp and ops.sample_reference): one 1024-thread block per row.
//   1. z = logits / temperature (fp32), e = exp(z - max z) and an order-preserving uint32 key of z
//      are written to a workspace.
//   2. top-k: the k-th largest key by a 32-step radix (bitwise) search on counts.
//   3. top-p: the boundary key by a 32-step bitwise search on the fp64 mass above a key.
//   4. ties at the boundary are kept in token-id order (block scan of tie counts), and the token is
//      drawn by inverse CDF over the kept tokens in token-id order (block scan of masses) with
//      u = uniform_for(seed, row).
// No sort. Rows where logits / temperature overflows fp32 (or temperature is 0) take the argmax.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_utils.h"
#include "ops.h"

namespace preflexor {
namespace {

constexpr int kThreads = 1024;

__device__ inline uint32_t ord_key(float f) {
  if (f == 0.f) f = 0.f;  // -0 and +0 compare equal; give them one key
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ inline float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  return __uint_as_float(u);
}

struct Shared {
  double d[kThreads];
  long long i[kThreads];
  double dr[32];
  long long ir[32];
  float fr[32];
  unsigned int ur[32];
};

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* __restrict__ logits, const float* __restrict__ temperature,
                              const int64_t* __restrict__ top_k, const float* __restrict__ top_p,
                              const int64_t* __restrict__ seeds, float* __restrict__ e_ws,
                              uint32_t* __restrict__ key_ws, int64_t* __restrict__ out, int64_t V) {
  __shared__ Shared sh;
  const int64_t row = blockIdx.x;
  const T* l = logits + row * V;
  float* e = e_ws + row * V;
  uint32_t* key = key_ws + row * V;
  const float temp = temperature[row];

  // z, its maximum and (for greedy / overflow) the first argmax of the logits
  float zmax = -INFINITY;
  if (temp != 0.f) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) zmax = fmaxf(zmax, static_cast<float>(l[i]) / temp);
    zmax = cuda::block_reduce(zmax, cuda::MaxOp<float>(), sh.fr);
  }
  if (temp == 0.f || !isfinite(zmax)) {
    float best = -INFINITY;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) best = fmaxf(best, static_cast<float>(l[i]));
    best = cuda::block_reduce(best, cuda::MaxOp<float>(), sh.fr);
    long long arg = V;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      if (static_cast<float>(l[i]) == best) {
        arg = i;
        break;
      }
    }
    arg = cuda::block_reduce(arg, cuda::MinOp<long long>(), sh.ir);
    if (threadIdx.x == 0) out[row] = arg < V ? arg : 0;
    return;
  }
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float z = static_cast<float>(l[i]) / temp;
    e[i] = expf(z - zmax);
    key[i] = ord_key(z);
  }
  __syncthreads();

  // ---- top-k: vk = k-th largest key; ties_k = how many tokens equal to vk are kept
  const int64_t kk = top_k[row];
  const bool use_k = kk > 0 && kk < V;
  uint32_t vk = 0;
  long long ties_k = 0;
  double ek = 0.0;  // e of a token with key vk
  double total_k = 0.0;
  if (use_k) {
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = prefix | (1u << bit);
      long long cnt = 0;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) cnt += key[i] >= cand;
      cnt = cuda::block_reduce(cnt, cuda::SumOp<long long>(), sh.ir);
      if (cnt >= kk) prefix = cand;
    }
    vk = prefix;
    long long gt = 0;
    double m_gt = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      if (key[i] > vk) {
        ++gt;
        m_gt += e[i];
      }
    }
    gt = cuda::block_reduce(gt, cuda::SumOp<long long>(), sh.ir);
    m_gt = cuda::block_reduce(m_gt, cuda::SumOp<double>(), sh.dr);
    ties_k = kk - gt;
    ek = static_cast<double>(expf(key_float(vk) - zmax));
    total_k = m_gt + static_cast<double>(ties_k) * ek;
  } else {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) s += e[i];
    total_k = cuda::block_reduce(s, cuda::SumOp<double>(), sh.dr);
  }

  // ---- top-p: boundary key vz and number of ties at vz to keep
  const float p = top_p[row];
  bool keep_all = !use_k;
  uint32_t vz = vk;
  long long ties = ties_k;
  if (p < 1.f) {
    const double need = static_cast<double>(p) * total_k;
    // mass of the top-k set with key >= t
    auto mass_from = [&](uint32_t t) -> double {
      double m = 0.0;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        if (key[i] >= t && (!use_k || key[i] > vk)) m += e[i];
      }
      m = cuda::block_reduce(m, cuda::SumOp<double>(), sh.dr);
      if (use_k && t <= vk) m += static_cast<double>(ties_k) * ek;
      return m;
    };
    uint32_t prefix = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = prefix | (1u << bit);
      if (mass_from(cand) >= need) prefix = cand;
    }
    vz = prefix;
    const double above = vz == 0xFFFFFFFFu ? 0.0 : mass_from(vz + 1);
    long long n_eq;
    if (use_k && vz == vk) {
      n_eq = ties_k;
    } else {
      long long c = 0;
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) c += key[i] == vz;
      n_eq = cuda::block_reduce(c, cuda::SumOp<long long>(), sh.ir);
    }
    const double ev = static_cast<double>(expf(key_float(vz) - zmax));
    long long j = n_eq;
    if (ev > 0.0) {
      j = static_cast<long long>(ceil((need - above) / ev));
      j = j < 1 ? 1 : (j > n_eq ? n_eq : j);
    }
    keep_all = false;
    ties = j;
  }

  // ---- draw over kept tokens in token-id order; thread t owns the contiguous chunk [c0, c1)
  const int64_t chunk = (V + blockDim.x - 1) / blockDim.x;
  const int64_t c0_raw = static_cast<int64_t>(threadIdx.x) * chunk;
  const int64_t c0 = c0_raw < V ? c0_raw : V, c1 = c0 + chunk < V ? c0 + chunk : V;
  long long my_ties = 0;
  if (!keep_all) {
    for (int64_t i = c0; i < c1; ++i) my_ties += key[i] == vz;
  }
  long long ties_total;
  const long long tie_base = cuda::block_exclusive_scan(my_ties, sh.i, &ties_total);
  auto kept = [&](int64_t i, long long& tie_rank) -> bool {
    if (keep_all) return true;
    const uint32_t kv = key[i];
    if (kv > vz) return true;
    if (kv == vz) return tie_rank++ < ties;
    return false;
  };
  double my_mass = 0.0;
  long long last_pos = -1;
  {
    long long rank = tie_base;
    for (int64_t i = c0; i < c1; ++i) {
      if (kept(i, rank)) {
        my_mass += e[i];
        if (e[i] > 0.f) last_pos = i;
      }
    }
  }
  double total;
  const double base = cuda::block_exclusive_scan(my_mass, sh.d, &total);
  const double next = threadIdx.x + 1 < blockDim.x ? sh.d[threadIdx.x] : total;  // inclusive prefix
  const double target = uniform_for(seeds[row], row) * total;
  long long found = V;
  if (base <= target && target < next) {
    double acc = base;
    long long rank = tie_base;
    for (int64_t i = c0; i < c1; ++i) {
      if (kept(i, rank)) {
        acc += e[i];
        if (acc > target) {
          found = i;
          break;
        }
      }
    }
    if (found == V && last_pos >= 0) found = last_pos;  // rounding at the chunk end
  }
  found = cuda::block_reduce(found, cuda::MinOp<long long>(), sh.ir);
  const long long last_any = cuda::block_reduce(last_pos, cuda::MaxOp<long long>(), sh.ir);
  if (threadIdx.x == 0) out[row] = found < V ? found : (last_any >= 0 ? last_any : 0);
}

}  // namespace

at::Tensor sample_cuda(const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& seeds) {
  TORCH_CHECK(logits_in.is_cuda() && logits_in.dim() == 2, "sample: logits must be a CUDA [B, V] tensor");
  const c10::cuda::OptionalCUDAGuard guard(logits_in.device());
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(V > 0, "sample: empty vocabulary");
  for (const at::Tensor* t : {&temperature, &top_k, &top_p, &seeds}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "sample: temperature, top_k, top_p and seeds must be [B]");
  }
  const at::Tensor logits = logits_in.contiguous();
  const auto dev = logits.device();
  const at::Tensor tt = temperature.to(dev, at::kFloat).contiguous();
  const at::Tensor kk = top_k.to(dev, at::kLong).contiguous();
  const at::Tensor pp = top_p.to(dev, at::kFloat).contiguous();
  const at::Tensor ss = seeds.to(dev, at::kLong).contiguous();
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0) return out;
  TORCH_CHECK(B <= 0x7FFFFFFF, "sample: too many rows");
  at::Tensor e_ws = at::empty({B, V}, logits.options().dtype(at::kFloat));
  at::Tensor key_ws = at::empty({B, V}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_cuda", [&] {
    sample_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), tt.data_ptr<float>(), kk.data_ptr<int64_t>(), pp.data_ptr<float>(),
        ss.data_ptr<int64_t>(), e_ws.data_ptr<float>(), reinterpret_cast<uint32_t*>(key_ws.data_ptr<int32_t>()),
        out.data_ptr<int64_t>(), V);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace preflexor
