// The vector kernels of the CPU decode step, written once over a vector traits struct (decode_vec.h)
// and compiled once per ISA path: decode_cpu.cpp includes this file inside a namespace per path, with
//   PREFLEXOR_DK_TARGET  the function attribute of the path (empty for the portable one)
//   PREFLEXOR_DK_VEC     its traits struct (Avx512Vec, Avx2Vec, GenericVec)
// No include guard: the file is meant to be included several times. It expects `Weight` and `Kernels`
// (decode_cpu.cpp) in the enclosing namespace.

using VT = PREFLEXOR_DK_VEC;
using Vec = typename VT::V;

// out[m] = sum_k x[m, k] * w[n, k] for MB rows of x and one weight row (raw, before the int8 scale).
// One weight row at a time: the matrix is read as one sequential stream (interleaving several rows
// halved the bandwidth the hardware prefetcher sustains); U independent accumulators per x row hide
// the FMA latency. Each cache line of the stream is also prefetched kPrefetchBytes ahead (past the row's
// end into the next rows): one thread alone does not keep enough lines in flight otherwise, and the
// narrow kinds (bf16, int8), with fewer bytes per instruction, fell to about half the bandwidth.
template <WKind KD, int MB>
PREFLEXOR_DK_TARGET void dot_rows(const float* x, int64_t ldx, const Weight& w, int64_t n, float out[4]) {
  constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  constexpr int W = VT::W;
  constexpr int64_t kStepBytes = int64_t(W) * U * weight_bytes<KD>();
  Vec acc[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = VT::zero();
  const int64_t K = w.k;
  const int64_t row = n * K;
  const char* ahead = static_cast<const char*>(w.data) + row * weight_bytes<KD>() + kPrefetchBytes;
  int64_t k = 0;
  for (; k + W * U <= K; k += W * U, ahead += kStepBytes) {
    for (int64_t b = 0; b < kStepBytes; b += kCacheLine) prefetch_read(ahead + b);
    Vec wv[U];
    for (int u = 0; u < U; ++u) wv[u] = VT::template load_w<KD>(w.data, row + k + W * u);
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = VT::fmadd(wv[u], VT::load(x + m * ldx + k + W * u), acc[m][u]);
  }
  for (; k + W <= K; k += W) {
    const Vec wv = VT::template load_w<KD>(w.data, row + k);
    for (int m = 0; m < MB; ++m) acc[m][0] = VT::fmadd(wv, VT::load(x + m * ldx + k), acc[m][0]);
  }
  if (k < K) {
    const Vec wv = VT::template load_w_n<KD>(w.data, row + k, K - k);
    for (int m = 0; m < MB; ++m) acc[m][0] = VT::fmadd(wv, VT::load_n(x + m * ldx + k, K - k), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    Vec a = acc[m][0];
    for (int u = 1; u < U; ++u) a = VT::add(a, acc[m][u]);
    out[m] = VT::reduce(a);
  }
}

// out[m][j] = sum_k x[m, k] * w[n + j, k] for MR rows of x and NR weight rows: a register tile of MR x NR
// accumulators, each weight vector widened once and used MR times (the compute-bound case of many rows).
// With `prefetch`, each cache line of the next NR weight rows is prefetched as the loop passes the same
// offset in the current ones: the first group of x rows pulls the next rows in while it computes, so the
// other groups find them in cache (without it the loads of each new weight row stalled on memory, about a
// third of the time of a 16-row step).
template <WKind KD, int MR, int NR>
PREFLEXOR_DK_TARGET void dot_tile(const float* x, int64_t ldx, const Weight& w, int64_t n, float out[4][4],
                                  bool prefetch) {
  constexpr int W = VT::W;
  constexpr int64_t kStepBytes = int64_t(W) * weight_bytes<KD>();
  Vec acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = VT::zero();
  const int64_t K = w.k;
  const int64_t row_bytes = K * weight_bytes<KD>();
  const char* next = static_cast<const char*>(w.data) + (n + NR) * row_bytes;
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    if (prefetch && ((k * weight_bytes<KD>()) % kCacheLine) < kStepBytes)
      for (int j = 0; j < NR; ++j) prefetch_read(next + j * row_bytes + k * weight_bytes<KD>());
    Vec wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = VT::template load_w<KD>(w.data, (n + j) * K + k);
    for (int m = 0; m < MR; ++m) {
      const Vec xv = VT::load(x + m * ldx + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = VT::fmadd(wv[j], xv, acc[m][j]);
    }
  }
  if (k < K) {
    Vec wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = VT::template load_w_n<KD>(w.data, (n + j) * K + k, K - k);
    for (int m = 0; m < MR; ++m) {
      const Vec xv = VT::load_n(x + m * ldx + k, K - k);
      for (int j = 0; j < NR; ++j) acc[m][j] = VT::fmadd(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m][j] = VT::reduce(acc[m][j]);
}

// NR weight rows from n against all M rows, x rows in groups of 4: y[m, n + j] (+)= out * scale[n + j].
template <WKind KD, int NR>
PREFLEXOR_DK_TARGET void tile_columns(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                                      bool accumulate, int64_t n) {
  float out[4][4];
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = x + m0 * ldx;
    const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
    const bool pf = m0 == 0;
    switch (mr) {
      case 4: dot_tile<KD, 4, NR>(xm, ldx, w, n, out, pf); break;
      case 3: dot_tile<KD, 3, NR>(xm, ldx, w, n, out, pf); break;
      case 2: dot_tile<KD, 2, NR>(xm, ldx, w, n, out, pf); break;
      default: dot_tile<KD, 1, NR>(xm, ldx, w, n, out, pf); break;
    }
    for (int m = 0; m < mr; ++m)
      for (int j = 0; j < NR; ++j) {
        const float s = w.scale != nullptr ? w.scale[n + j] : 1.0f;
        float* yv = y + (m0 + m) * ldy + n + j;
        *yv = accumulate ? *yv + out[m][j] * s : out[m][j] * s;
      }
  }
}

// Weight rows [n0, n1) in groups of NR (the last few one at a time) against x rows in groups of 4.
template <WKind KD, int NR>
PREFLEXOR_DK_TARGET void matmul_tiles(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                                      bool accumulate, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_columns<KD, NR>(x, M, ldx, w, y, ldy, accumulate, n);
  for (; n < n1; ++n) tile_columns<KD, 1>(x, M, ldx, w, y, ldy, accumulate, n);
}

// y[m, n] (+)= x[m, :] . w[n, :] * scale[n] for weight rows [n0, n1) and all M rows; `accumulate` adds to y
// (the residual). Up to kTileFrom - 1 rows: x rows in groups of 4 per weight row (a row is re-read from L1
// for the next group), the weight read as one prefetched stream; from kTileFrom rows on (compute-bound)
// register tiles of 4 x rows by VT::kTileN weight rows.
template <WKind KD>
PREFLEXOR_DK_TARGET void matmul_rows(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                                     bool accumulate, int64_t n0, int64_t n1) {
  if constexpr (VT::kTileN > 0) {
    if (M >= kTileFrom) return matmul_tiles<KD, VT::kTileN>(x, M, ldx, w, y, ldy, accumulate, n0, n1);
  }
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    const float s = w.scale != nullptr ? w.scale[n] : 1.0f;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
      const float* xm = x + m0 * ldx;
      switch (mb) {
        case 4: dot_rows<KD, 4>(xm, ldx, w, n, out); break;
        case 3: dot_rows<KD, 3>(xm, ldx, w, n, out); break;
        case 2: dot_rows<KD, 2>(xm, ldx, w, n, out); break;
        default: dot_rows<KD, 1>(xm, ldx, w, n, out); break;
      }
      for (int m = 0; m < mb; ++m) {
        float* yv = y + (m0 + m) * ldy + n;
        *yv = accumulate ? *yv + out[m] * s : out[m] * s;
      }
    }
  }
}

// The rows of the weight split over threads (at::parallel_for; with one thread there is no task overhead).
template <WKind KD>
void matmul_kind(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy, bool accumulate) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, w.k * M));
  at::parallel_for(0, w.n, grain, [&](int64_t n0, int64_t n1) {
    matmul_rows<KD>(x, M, ldx, w, y, ldy, accumulate, n0, n1);
  });
}

void matmul(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy, bool accumulate) {
  switch (w.kind) {
    case WKind::F32: matmul_kind<WKind::F32>(x, M, ldx, w, y, ldy, accumulate); break;
    case WKind::BF16: matmul_kind<WKind::BF16>(x, M, ldx, w, y, ldy, accumulate); break;
    case WKind::I8: matmul_kind<WKind::I8>(x, M, ldx, w, y, ldy, accumulate); break;
  }
}

// y = x * rsqrt(mean(x^2) + eps) * w per row, fp32.
PREFLEXOR_DK_TARGET void rms_norm_rows(const float* x, const float* w, float* y, int64_t B, int64_t H, float eps) {
  constexpr int W = VT::W;
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * H;
    float* yr = y + b * H;
    Vec acc = VT::zero();
    int64_t i = 0;
    for (; i + W <= H; i += W) {
      const Vec v = VT::load(xr + i);
      acc = VT::fmadd(v, v, acc);
    }
    if (i < H) {
      const Vec v = VT::load_n(xr + i, H - i);
      acc = VT::fmadd(v, v, acc);
    }
    const Vec sv = VT::set1(1.0f / std::sqrt(VT::reduce(acc) / static_cast<float>(H) + eps));
    for (i = 0; i + W <= H; i += W) VT::store(yr + i, VT::mul(VT::mul(VT::load(xr + i), sv), VT::load(w + i)));
    if (i < H)
      VT::store_n(yr + i, VT::mul(VT::mul(VT::load_n(xr + i, H - i), sv), VT::load_n(w + i, H - i)), H - i);
  }
}

// out = silu(gate) * up per row; gu holds [gate | up] (2I floats a row).
PREFLEXOR_DK_TARGET void silu_mul(const float* gu, float* out, int64_t B, int64_t I) {
  constexpr int W = VT::W;
  const Vec one = VT::set1(1.0f);
  for (int64_t b = 0; b < B; ++b) {
    const float* g = gu + b * 2 * I;
    const float* u = g + I;
    float* o = out + b * I;
    for (int64_t i = 0; i < I; i += W) {
      const int64_t n = std::min<int64_t>(W, I - i);
      const Vec gv = n == W ? VT::load(g + i) : VT::load_n(g + i, n);
      const Vec uv = n == W ? VT::load(u + i) : VT::load_n(u + i, n);
      const Vec s = VT::div(gv, VT::add(one, VT::exp(VT::sub(VT::zero(), gv))));
      if (n == W) VT::store(o + i, VT::mul(s, uv));
      else VT::store_n(o + i, VT::mul(s, uv), n);
    }
  }
}

// A cache vector (fp32 or bf16) widened to fp32, the first n lanes.
template <typename T>
PREFLEXOR_ALWAYS_INLINE PREFLEXOR_DK_TARGET Vec load_cache(const T* p, int64_t n) {
  constexpr WKind KD = std::is_same_v<T, float> ? WKind::F32 : WKind::BF16;
  return n >= VT::W ? VT::template load_w<KD>(p, 0) : VT::template load_w_n<KD>(p, 0, n);
}

// One row, one kv head: the G = Hq / Hkv query heads q (G, D) attend over S cached positions
// kc/vc (S, D); o (G, D). scores: scratch of G * S floats. fp32 softmax.
template <typename T>
PREFLEXOR_DK_TARGET void attend_group(const float* q, int64_t G, int64_t D, const T* kc, const T* vc, int64_t S,
                                      float* o, float* scores) {
  constexpr int W = VT::W;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t j = 0; j < S; ++j) {
    const T* kj = kc + j * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      Vec acc = VT::zero();
      for (int64_t d = 0; d < D; d += W) {
        const int64_t n = std::min<int64_t>(W, D - d);
        acc = VT::fmadd(n == W ? VT::load(qg + d) : VT::load_n(qg + d, n), load_cache<T>(kj + d, n), acc);
      }
      scores[g * S + j] = VT::reduce(acc) * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * S;
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; ++j) mx = std::max(mx, sg[j]);
    const Vec mv = VT::set1(mx);
    Vec sum = VT::zero();
    for (int64_t j = 0; j < S; j += W) {
      const int64_t n = std::min<int64_t>(W, S - j);
      const Vec e = VT::exp(VT::sub(VT::load_n(sg + j, n), mv));
      VT::store_n(sg + j, e, n);
      sum = VT::add(sum, VT::load_n(sg + j, n));   // reload: lanes past n are 0
    }
    const float inv = 1.0f / VT::reduce(sum);
    for (int64_t j = 0; j < S; ++j) sg[j] *= inv;
  }
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = scores + g * S;
    float* og = o + g * D;
    for (int64_t d = 0; d < D; d += W) {
      const int64_t n = std::min<int64_t>(W, D - d);
      Vec acc = VT::zero();
      for (int64_t j = 0; j < S; ++j) acc = VT::fmadd(VT::set1(pg[j]), load_cache<T>(vc + j * D + d, n), acc);
      if (n == W) VT::store(og + d, acc);
      else VT::store_n(og + d, acc, n);
    }
  }
}

inline Kernels table() {
  return Kernels{&matmul, &rms_norm_rows, &silu_mul, &attend_group<float>, &attend_group<c10::BFloat16>};
}
