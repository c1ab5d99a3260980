// Vector traits of the CPU decode kernels (decode_kernels.h), one struct per ISA path:
//   Avx512Vec  16 fp32 lanes, masked tails
//   Avx2Vec    8 fp32 lanes (AVX2 + FMA), tails through a small stack buffer
//   GenericVec 8 fp32 lanes as a plain array; the compiler vectorises the lane loops for the build's
//              baseline ISA (SSE2 on x86-64, NEON on aarch64); no ISA-specific code
// Each offers: zero, set1, load / load_n (the first n < W lanes, the rest 0), store / store_n, load_w<KD> /
// load_w_n<KD> (a weight or cache row widened to fp32: bf16 by a shift, int8 by sign extension), fmadd,
// add, sub, mul, div, max, reduce (horizontal sum) and exp (fp32 exp, relative error ~2e-7).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_isa.h"

namespace preflexor {

enum class WKind { F32, BF16, I8 };

template <WKind KD>
constexpr int64_t weight_bytes() {
  return KD == WKind::F32 ? 4 : (KD == WKind::BF16 ? 2 : 1);
}

// Software prefetch of the weight stream (dot_rows): a cache line, and how far ahead of the reads it is
// fetched (4 KiB measured at 94% of a one-thread `sum`'s bandwidth for bf16 and int8 on an AVX-512 Xeon,
// against about 55% without; 2-4 KiB were alike).
constexpr int64_t kCacheLine = 64;
constexpr int64_t kPrefetchBytes = 4096;
// Products of at least this many rows run as register tiles (decode_kernels.h: matmul_tiles) of 4 x rows
// by kTileN weight rows (per traits struct; 0: no tiles). Measured at 16 rows against four calls of 4 rows
// (SmolLM2's shapes, one thread, Intel Xeon): avx2 with 3 weight rows 1.26-1.53x faster (fp32, bf16,
// int8); avx512 with 2 or 4 weight rows and the portable path with 2 were no faster or slower for bf16 and
// int8 (0.7-1.0x), so they keep the row-group loop (and at 3+ rows fp32 and bf16 run oneDNN's products).
constexpr int64_t kTileFrom = 5;

PREFLEXOR_ALWAYS_INLINE void prefetch_read(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// One element of a weight row as fp32 (the scalar form of every path's widening).
template <WKind KD>
PREFLEXOR_ALWAYS_INLINE float widen(const void* base, int64_t i) {
  if constexpr (KD == WKind::F32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (KD == WKind::BF16) {
    const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return static_cast<float>(static_cast<const int8_t*>(base)[i]);
  }
}

struct GenericVec {
  static constexpr int W = 8;
  static constexpr int kTileN = 0;
  struct V {
    float v[W];
  };
  static PREFLEXOR_ALWAYS_INLINE V zero() { return set1(0.0f); }
  static PREFLEXOR_ALWAYS_INLINE V set1(float f) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = f;
    return r;
  }
  static PREFLEXOR_ALWAYS_INLINE V load(const float* p) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static PREFLEXOR_ALWAYS_INLINE V load_n(const float* p, int64_t n) {
    V r = zero();
    for (int64_t i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }
  static PREFLEXOR_ALWAYS_INLINE void store(float* p, const V& v) {
    for (int i = 0; i < W; ++i) p[i] = v.v[i];
  }
  static PREFLEXOR_ALWAYS_INLINE void store_n(float* p, const V& v, int64_t n) {
    for (int64_t i = 0; i < n; ++i) p[i] = v.v[i];
  }
  template <WKind KD>
  static PREFLEXOR_ALWAYS_INLINE V load_w(const void* base, int64_t off) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = widen<KD>(base, off + i);
    return r;
  }
  template <WKind KD>
  static PREFLEXOR_ALWAYS_INLINE V load_w_n(const void* base, int64_t off, int64_t n) {
    V r = zero();
    for (int64_t i = 0; i < n; ++i) r.v[i] = widen<KD>(base, off + i);
    return r;
  }
#define PREFLEXOR_GENERIC_BINARY(name, expr)                     \
  static PREFLEXOR_ALWAYS_INLINE V name(const V& a, const V& b) { \
    V r;                                                         \
    for (int i = 0; i < W; ++i) r.v[i] = (expr);                 \
    return r;                                                    \
  }
  PREFLEXOR_GENERIC_BINARY(add, a.v[i] + b.v[i])
  PREFLEXOR_GENERIC_BINARY(sub, a.v[i] - b.v[i])
  PREFLEXOR_GENERIC_BINARY(mul, a.v[i] * b.v[i])
  PREFLEXOR_GENERIC_BINARY(div, a.v[i] / b.v[i])
  PREFLEXOR_GENERIC_BINARY(max, a.v[i] > b.v[i] ? a.v[i] : b.v[i])
#undef PREFLEXOR_GENERIC_BINARY
  static PREFLEXOR_ALWAYS_INLINE V fmadd(const V& a, const V& b, const V& c) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static PREFLEXOR_ALWAYS_INLINE float reduce(const V& v) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v.v[i];
    return s;
  }
  static PREFLEXOR_ALWAYS_INLINE V exp(const V& x) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = std::exp(x.v[i]);
    return r;
  }
};

#ifdef PREFLEXOR_X86
// exp shared by the two x86 paths: x = n ln2 + f with |f| <= ln2 / 2, p(f) a degree-6 Taylor polynomial.
#define PREFLEXOR_EXP_POLY(P, FMA, SET1, x, n, f)                        \
  f = FMA(n, SET1(-0.693359375f), x); /* ln2 split in two parts */        \
  f = FMA(n, SET1(2.12194440e-4f), f);                                   \
  P = SET1(1.0f / 720);                                                  \
  P = FMA(P, f, SET1(1.0f / 120));                                       \
  P = FMA(P, f, SET1(1.0f / 24));                                        \
  P = FMA(P, f, SET1(1.0f / 6));                                         \
  P = FMA(P, f, SET1(0.5f));                                             \
  P = FMA(P, f, SET1(1.0f));                                             \
  P = FMA(P, f, SET1(1.0f));

struct Avx512Vec {
  static constexpr int W = 16;
  static constexpr int kTileN = 0;
  using V = __m512;
#define PREFLEXOR_F static PREFLEXOR_ALWAYS_INLINE PREFLEXOR_TARGET_AVX512
  PREFLEXOR_F __mmask16 mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
  PREFLEXOR_F V zero() { return _mm512_setzero_ps(); }
  PREFLEXOR_F V set1(float f) { return _mm512_set1_ps(f); }
  PREFLEXOR_F V load(const float* p) { return _mm512_loadu_ps(p); }
  PREFLEXOR_F V load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  PREFLEXOR_F void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  PREFLEXOR_F void store_n(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  template <WKind KD>
  PREFLEXOR_F V load_w_m(const void* base, int64_t off, __mmask16 m) {
    if constexpr (KD == WKind::F32) {
      return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + off);
    } else if constexpr (KD == WKind::BF16) {
      const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + off);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      const __m128i b = _mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(base) + off);
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
  }
  template <WKind KD>
  PREFLEXOR_F V load_w(const void* base, int64_t off) { return load_w_m<KD>(base, off, 0xFFFF); }
  template <WKind KD>
  PREFLEXOR_F V load_w_n(const void* base, int64_t off, int64_t n) { return load_w_m<KD>(base, off, mask(n)); }
  PREFLEXOR_F V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  PREFLEXOR_F V add(V a, V b) { return _mm512_add_ps(a, b); }
  PREFLEXOR_F V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  PREFLEXOR_F V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  PREFLEXOR_F V div(V a, V b) { return _mm512_div_ps(a, b); }
  PREFLEXOR_F V max(V a, V b) { return _mm512_max_ps(a, b); }
  PREFLEXOR_F float reduce(V v) { return _mm512_reduce_add_ps(v); }
  // below -87.3 the result is 2^-126 (about 1e-38), above 88.7 it is +inf
  PREFLEXOR_F V exp(V x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(-87.33654f)), set1(88.72283f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V f, p;
    PREFLEXOR_EXP_POLY(p, fmadd, set1, x, n, f)
    return _mm512_scalef_ps(p, n);
  }
#undef PREFLEXOR_F
};

struct Avx2Vec {
  static constexpr int W = 8;
  static constexpr int kTileN = 3;
  using V = __m256;
#define PREFLEXOR_F static PREFLEXOR_ALWAYS_INLINE PREFLEXOR_TARGET_AVX2
  PREFLEXOR_F V zero() { return _mm256_setzero_ps(); }
  PREFLEXOR_F V set1(float f) { return _mm256_set1_ps(f); }
  PREFLEXOR_F V load(const float* p) { return _mm256_loadu_ps(p); }
  PREFLEXOR_F V load_n(const float* p, int64_t n) {
    alignas(32) float tmp[W] = {};
    std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(float));
    return _mm256_load_ps(tmp);
  }
  PREFLEXOR_F void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  PREFLEXOR_F void store_n(float* p, V v, int64_t n) {
    alignas(32) float tmp[W];
    _mm256_store_ps(tmp, v);
    std::memcpy(p, tmp, static_cast<size_t>(n) * sizeof(float));
  }
  template <WKind KD>
  PREFLEXOR_F V load_w(const void* base, int64_t off) {
    if constexpr (KD == WKind::F32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + off);
    } else if constexpr (KD == WKind::BF16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + off));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + off));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
  }
  template <WKind KD>
  PREFLEXOR_F V load_w_n(const void* base, int64_t off, int64_t n) {
    alignas(32) float tmp[W] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = widen<KD>(base, off + i);
    return _mm256_load_ps(tmp);
  }
  PREFLEXOR_F V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  PREFLEXOR_F V add(V a, V b) { return _mm256_add_ps(a, b); }
  PREFLEXOR_F V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  PREFLEXOR_F V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  PREFLEXOR_F V div(V a, V b) { return _mm256_div_ps(a, b); }
  PREFLEXOR_F V max(V a, V b) { return _mm256_max_ps(a, b); }
  PREFLEXOR_F float reduce(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
  }
  // below -87.3 the result is 2^-126 (about 1e-38); the top is clamped at exp(88) (about 1.7e38), so
  // that 2^n stays a normal float built from its exponent bits.
  PREFLEXOR_F V exp(V x) {
    x = _mm256_min_ps(_mm256_max_ps(x, set1(-87.33654f)), set1(88.0f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V f, p;
    PREFLEXOR_EXP_POLY(p, fmadd, set1, x, n, f)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
#undef PREFLEXOR_F
};
#undef PREFLEXOR_EXP_POLY
#endif  // PREFLEXOR_X86

}  // namespace preflexor
