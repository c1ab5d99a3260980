// CPU decode: one new token per row through every layer of a Llama model in one call, and the
// small-M matrix product it is built on.
//
//   decode_matmul(x (M, K) float, w (N, K) fp32 | bf16 | int8, scale (N,) fp32 or empty) -> (M, N) fp32
//       y = x @ (w * scale[:, None]).T; fp32 accumulation. Weight-only: x stays fp32, each weight is
//       widened to fp32 in registers (bf16: a shift; int8: sign-extend and convert), the per-row int8
//       scale is applied once per output. Meant for the few rows of a decode step, where the product
//       streams the weights once and is bound by memory bandwidth.
//   decode_step(x (B, H), lengths (B,) int64, cos/sin (B, D) fp32, norms, mats, scales, k_cache,
//       v_cache, n_heads, n_kv_heads, eps) -> logits (B, V) fp32
//       The hidden state stays fp32 from the embedding to the logits (the residual stream and every
//       intermediate); only the KV cache keeps the model's dtype. Per layer: RMSNorm, q/k/v products,
//       rotary embedding (rotate_half convention), k/v written at position lengths[b] of row b of the
//       cache (L, B, Hkv, max_len, D), grouped-query attention of the new token over positions
//       0..lengths[b] with an fp32 softmax, the output product added to the residual, RMSNorm, gate/up
//       products, silu(gate) * up, the down product added to the residual; then the final RMSNorm and
//       the LM head. norms: 2L + 1 vectors (input, post-attention per layer; final). mats: 7L + 1
//       weights (q, k, v, o, gate, up, down per layer; head), all fp32, all bf16 or all int8 with
//       scales (7L + 1 vectors, else an empty list); or 4L + 1 oneDNN-packed weights (q/k/v, o,
//       gate/up, down; head) whose products run through mkldnn::_linear_pointwise on activations
//       rounded to the weights' dtype (faster from a few rows on). The caller advances the lengths.
//
// The vector kernels (decode_kernels.h) exist for three ISA paths (cpu_isa.h): AVX-512, AVX2 + FMA and
// portable C++; the active path is read at each call, so every CPU runs the ops. Rows of the products
// run in parallel through at::parallel_for; with one thread there is no task overhead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "decode_vec.h"
#include "ops.h"

namespace preflexor {
namespace {

struct Weight {
  const void* data;
  WKind kind;
  int64_t n, k;
  const float* scale;  // per output row (int8), else nullptr
};

WKind kind_of(const at::Tensor& w, const char* name) {
  switch (w.scalar_type()) {
    case at::kFloat: return WKind::F32;
    case at::kBFloat16: return WKind::BF16;
    case at::kChar: return WKind::I8;
    default: TORCH_CHECK(false, name, ": weights must be float32, bfloat16 or int8, got ", w.scalar_type());
  }
  return WKind::F32;
}

Weight as_weight(const at::Tensor& w, const at::Tensor* scale, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), name,
              ": each weight must be a contiguous 2-D CPU tensor, got ", w.sizes(), " on ", w.device());
  Weight out{w.data_ptr(), kind_of(w, name), w.size(0), w.size(1), nullptr};
  if (out.kind == WKind::I8) {
    TORCH_CHECK(scale != nullptr && scale->defined() && scale->scalar_type() == at::kFloat && scale->dim() == 1 &&
                    scale->size(0) == w.size(0) && scale->is_contiguous(),
                name, ": an int8 weight of shape ", w.sizes(), " needs a contiguous fp32 scale of shape [",
                w.size(0), "]");
    out.scale = scale->data_ptr<float>();
  }
  return out;
}

// The kernels of one ISA path.
struct Kernels {
  void (*matmul)(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy, bool accumulate);
  void (*rms_norm_rows)(const float* x, const float* w, float* y, int64_t B, int64_t H, float eps);
  void (*silu_mul)(const float* gu, float* out, int64_t B, int64_t I);
  void (*attend_f32)(const float* q, int64_t G, int64_t D, const float* kc, const float* vc, int64_t S, float* o,
                     float* scores);
  void (*attend_bf16)(const float* q, int64_t G, int64_t D, const c10::BFloat16* kc, const c10::BFloat16* vc,
                      int64_t S, float* o, float* scores);
};

namespace generic {
#define PREFLEXOR_DK_TARGET
#define PREFLEXOR_DK_VEC GenericVec
#include "decode_kernels.h"
#undef PREFLEXOR_DK_VEC
#undef PREFLEXOR_DK_TARGET
}  // namespace generic

#ifdef PREFLEXOR_X86
namespace avx2 {
#define PREFLEXOR_DK_TARGET PREFLEXOR_TARGET_AVX2
#define PREFLEXOR_DK_VEC Avx2Vec
#include "decode_kernels.h"
#undef PREFLEXOR_DK_VEC
#undef PREFLEXOR_DK_TARGET
}  // namespace avx2

namespace avx512 {
#define PREFLEXOR_DK_TARGET PREFLEXOR_TARGET_AVX512
#define PREFLEXOR_DK_VEC Avx512Vec
#include "decode_kernels.h"
#undef PREFLEXOR_DK_VEC
#undef PREFLEXOR_DK_TARGET
}  // namespace avx512
#endif

// The kernels of the active ISA path (cpu_isa.h).
Kernels active_kernels() {
#ifdef PREFLEXOR_X86
  switch (active_isa()) {
    case Isa::Avx512: return avx512::table();
    case Isa::Avx2: return avx2::table();
    default: break;
  }
#endif
  return generic::table();
}

// HF rotate_half: out[i] = x[i] cos[i] - x[i + D/2] sin[i], out[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2].
void rope_heads(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t h2 = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < h2; ++i) {
      const float a = v[i], b = v[i + h2];
      v[i] = a * cos[i] - b * sin[i];
      v[i + h2] = b * cos[i + h2] + a * sin[i + h2];
    }
  }
}

// The products of a step, by group: per layer 0 = q/k/v, 1 = o, 2 = gate/up, 3 = down; then the head.
// Either raw weights (7 per layer + head, this file's kernels) or oneDNN-packed weights (4 per layer +
// head: q/k/v and gate/up concatenated, as sampler.cpu_pack makes them), called through the dispatcher
// on activations in the packed weights' dtype; the latter wins from a few rows on.
struct Products {
  std::vector<Weight> raw;
  std::vector<at::Tensor> packed;
  int64_t L = 0;

  Kernels K;

  void run(int64_t l, int g, const float* x, int64_t M, int64_t Kd, float* y, int64_t ldy, bool acc) const {
    if (packed.empty()) {
      const Weight* w = l < L ? raw.data() + 7 * l : raw.data() + 7 * L;
      if (l == L) return K.matmul(x, M, Kd, w[0], y, ldy, acc);
      static constexpr int first[4] = {0, 3, 4, 6}, count[4] = {3, 1, 2, 1};
      int64_t off = 0;
      for (int i = first[g]; i < first[g] + count[g]; ++i) {
        K.matmul(x, M, Kd, w[i], y + off, ldy, acc);
        off += w[i].n;
      }
      return;
    }
    const at::Tensor& wp = packed[l < L ? 4 * l + g : 4 * L];
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {M, Kd}, at::kFloat).to(wp.scalar_type());
    std::vector<c10::IValue> stack{xt, wp, c10::IValue(), std::string("none"),
                                   c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    op.callBoxed(&stack);
    const at::Tensor yt = stack[0].toTensor().to(at::kFloat).contiguous();
    const int64_t N = yt.size(1);
    const float* yp = yt.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * ldy + n] = acc ? y[m * ldy + n] + yp[m * N + n] : yp[m * N + n];
  }
};

template <typename T>
void decode_layers(float* h, const int64_t* lengths, const float* cos, const float* sin,
                   const std::vector<at::Tensor>& norms, const Products& P, T* kcache, T* vcache, int64_t B,
                   int64_t H, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_len, int64_t L, int64_t I, float eps,
                   float* logits) {
  const int64_t G = Hq / Hkv;
  const int64_t nq = Hq * D, nkv = Hkv * D, nqkv = nq + 2 * nkv;
  int64_t max_s = 0;
  for (int64_t b = 0; b < B; ++b) max_s = std::max(max_s, lengths[b] + 1);
  std::vector<float> xn(B * H), qkv(B * nqkv), att(B * nq), gu(B * 2 * I), act(B * I);
  const int64_t layer_stride = B * Hkv * max_len * D;
  const auto attend = [&](const float* q, int64_t G_, int64_t D_, const T* kc, const T* vc, int64_t S, float* o,
                          float* scores) {
    if constexpr (std::is_same_v<T, float>) P.K.attend_f32(q, G_, D_, kc, vc, S, o, scores);
    else P.K.attend_bf16(q, G_, D_, kc, vc, S, o, scores);
  };
  for (int64_t l = 0; l < L; ++l) {
    P.K.rms_norm_rows(h, norms[2 * l].data_ptr<float>(), xn.data(), B, H, eps);
    P.run(l, 0, xn.data(), B, H, qkv.data(), nqkv, false);
    T* kl = kcache + l * layer_stride;
    T* vl = vcache + l * layer_stride;
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv.data() + b * nqkv;
      rope_heads(row, Hq + Hkv, D, cos + b * D, sin + b * D);   // q heads then k heads, adjacent
      const int64_t pos = lengths[b];
      for (int64_t g = 0; g < Hkv; ++g) {
        T* kd = kl + ((b * Hkv + g) * max_len + pos) * D;
        T* vd = vl + ((b * Hkv + g) * max_len + pos) * D;
        for (int64_t d = 0; d < D; ++d) {
          kd[d] = from_f32<T>(row[nq + g * D + d]);
          vd[d] = from_f32<T>(row[nq + nkv + g * D + d]);
        }
      }
    }
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores(G * max_s);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hkv, g = t % Hkv;
        const T* kc = kl + (b * Hkv + g) * max_len * D;
        const T* vc = vl + (b * Hkv + g) * max_len * D;
        attend(qkv.data() + b * nqkv + g * G * D, G, D, kc, vc, lengths[b] + 1,
                        att.data() + b * nq + g * G * D, scores.data());
      }
    });
    P.run(l, 1, att.data(), B, nq, h, H, true);
    P.K.rms_norm_rows(h, norms[2 * l + 1].data_ptr<float>(), xn.data(), B, H, eps);
    P.run(l, 2, xn.data(), B, H, gu.data(), 2 * I, false);
    P.K.silu_mul(gu.data(), act.data(), B, I);
    P.run(l, 3, act.data(), B, I, h, H, true);
  }
  P.K.rms_norm_rows(h, norms[2 * L].data_ptr<float>(), xn.data(), B, H, eps);
  P.run(L, 0, xn.data(), B, H, logits, P.packed.empty() ? P.raw.back().n : P.packed.back().size(0), false);
}

}  // namespace

at::Tensor decode_matmul_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "decode_matmul: need x (M, K) and w (N, K); got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.is_floating_point() && x.device().is_cpu(), "decode_matmul: x must be a floating CPU tensor");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor wc = w.contiguous();
  const bool int8 = wc.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || scale.numel() == 0, "decode_matmul: a scale is only for int8 weights");
  const Weight W = as_weight(wc, int8 ? &scale : nullptr, "decode_matmul");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) > 0 && w.size(0) > 0)
    active_kernels().matmul(xf.data_ptr<float>(), x.size(0), x.size(1), W, y.data_ptr<float>(), w.size(0), false);
  return y;
}

at::Tensor decode_step_cpu(const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& cos, const at::Tensor& sin,
                           at::TensorList norms, at::TensorList mats, at::TensorList scales, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, int64_t n_heads, int64_t n_kv_heads, double eps) {
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "decode_step: k_cache and v_cache must be contiguous (L, B, Hkv, max_len, D) tensors of one dtype; got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t L = k_cache.size(0), B = k_cache.size(1), Hkv = k_cache.size(2), max_len = k_cache.size(3),
                D = k_cache.size(4);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B, "decode_step: x must be (B, H) with B = ", B, ", got ", x.sizes());
  const int64_t H = x.size(1);
  TORCH_CHECK(Hkv == n_kv_heads && n_heads % n_kv_heads == 0 && D % 2 == 0,
              "decode_step: n_heads=", n_heads, ", n_kv_heads=", n_kv_heads, " do not fit a cache with ", Hkv,
              " kv heads of dim ", D);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong,
              "decode_step: lengths must be int64 (B,)");
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({B, D}) && sin.sizes() == cos.sizes() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "decode_step: cos and sin must be fp32 (B, D) = (", B, ", ", D, "), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L + 1, "decode_step: need ", 2 * L + 1, " norm weights, got ",
              norms.size());
  const at::Tensor lens = lengths.contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] < max_len, "decode_step: row ", b, " has length ", lp[b],
                ": the cache (max_len=", max_len, ") has no free slot for the new token");
  std::vector<at::Tensor> nf;
  nf.reserve(norms.size());
  for (const auto& n : norms) {
    TORCH_CHECK(n.dim() == 1 && n.size(0) == H, "decode_step: every norm weight must be (", H, ",), got ", n.sizes());
    nf.push_back(n.to(at::kFloat).contiguous());
  }
  const int64_t nq = n_heads * D, nkv = Hkv * D;
  Products P;
  P.L = L;
  P.K = active_kernels();
  int64_t I = 0, V = 0;
  if (static_cast<int64_t>(mats.size()) == 4 * L + 1 && !mats.empty() && mats[0].layout() == at::kMkldnn) {
    TORCH_CHECK(scales.empty(), "decode_step: packed weights take no scales");
    for (const auto& m : mats) {
      TORCH_CHECK(m.layout() == at::kMkldnn && m.dim() == 2 && m.scalar_type() == mats[0].scalar_type() &&
                      (m.scalar_type() == at::kFloat || m.scalar_type() == at::kBFloat16),
                  "decode_step: packed weights must all be oneDNN-reordered fp32 or bf16 (N, K) tensors");
      P.packed.push_back(m);
    }
    I = mats[2].size(0) / 2;
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* w = &P.packed[4 * l];
      TORCH_CHECK(w[0].size(0) == nq + 2 * nkv && w[0].size(1) == H && w[1].size(0) == H && w[1].size(1) == nq &&
                      w[2].size(0) == 2 * I && w[2].size(1) == H && w[3].size(0) == H && w[3].size(1) == I,
                  "decode_step: the packed weights of layer ", l, " do not match hidden ", H, ", ", n_heads,
                  " heads and ", Hkv, " kv heads of dim ", D);
    }
    TORCH_CHECK(P.packed.back().size(1) == H, "decode_step: the head weight must be (V, ", H, ")");
    V = P.packed.back().size(0);
  } else {
    TORCH_CHECK(static_cast<int64_t>(mats.size()) == 7 * L + 1, "decode_step: need ", 7 * L + 1,
                " weights (or ", 4 * L + 1, " oneDNN-packed ones), got ", mats.size());
    TORCH_CHECK(scales.empty() || scales.size() == mats.size(), "decode_step: scales must be empty or one per weight");
    const WKind kind0 = kind_of(mats[0], "decode_step");
    for (size_t i = 0; i < mats.size(); ++i) {
      const at::Tensor* s = scales.empty() ? nullptr : &scales[i];
      P.raw.push_back(as_weight(mats[i], s, "decode_step"));
      TORCH_CHECK(P.raw.back().kind == kind0, "decode_step: all weights must share one dtype");
    }
    I = P.raw[4].n;
    for (int64_t l = 0; l < L; ++l) {
      const Weight* w = P.raw.data() + 7 * l;
      TORCH_CHECK(w[0].n == nq && w[0].k == H && w[1].n == nkv && w[1].k == H && w[2].n == nkv && w[2].k == H &&
                      w[3].n == H && w[3].k == nq && w[4].n == I && w[4].k == H && w[5].n == I && w[5].k == H &&
                      w[6].n == H && w[6].k == I,
                  "decode_step: the weights of layer ", l, " do not match hidden ", H, ", ", n_heads, " heads and ",
                  Hkv, " kv heads of dim ", D);
    }
    TORCH_CHECK(P.raw.back().k == H, "decode_step: the head weight must be (V, ", H, ")");
    V = P.raw.back().n;
  }
  at::Tensor h = x.to(at::kFloat).contiguous().clone();
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor logits = at::empty({B, V}, x.options().dtype(at::kFloat));
  if (k_cache.scalar_type() == at::kFloat) {
    decode_layers<float>(h.data_ptr<float>(), lp, cc.data_ptr<float>(), sc.data_ptr<float>(), nf, P,
                         k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), B, H, n_heads, Hkv, D, max_len, L, I,
                         static_cast<float>(eps), logits.data_ptr<float>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "decode_step: the cache must be float32 or bfloat16, got ",
                k_cache.scalar_type());
    decode_layers<c10::BFloat16>(h.data_ptr<float>(), lp, cc.data_ptr<float>(), sc.data_ptr<float>(), nf, P,
                                 k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), B, H, n_heads,
                                 Hkv, D, max_len, L, I, static_cast<float>(eps), logits.data_ptr<float>());
  }
  return logits;
}

}  // namespace preflexor
