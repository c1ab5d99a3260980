// CPU kernel for token sampling with per-row temperature / top-k / top-p and a counter-based RNG.
//
// For each row b: temperature 0 -> argmax (first maximal index); so are rows where logits / temperature
// overflows fp32. Otherwise
//   z = logits / temperature (fp32), e = exp(z - max z)
//   top-k (k > 0 and k < V): keep the k largest z
//   top-p (p < 1): over the top-k set renormalised, keep the smallest prefix in descending order
//                  whose cumulative probability reaches p (at least one token)
//   draw by inverse CDF over the kept tokens in token-id order with u = uniform_for(seed_b, b).
// Tie semantics: tokens with exactly equal z rank by token id, lower id first (the order a stable
// descending sort gives), both for the top-k cut and for the top-p cut.
// No sort of the vocabulary: top-k uses nth_element; top-p first builds a mass histogram over
// max z - z (4096 bins of width 1/128, monotone in z), finds the bin where the cumulative mass
// reaches p, and runs a weighted quickselect (3-way partition around a median-of-3 pivot, masses in
// fp64) on the tokens of that bin only (with top-k: on the k candidates).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

namespace preflexor {
namespace {

struct Cand {
  float z;
  float e;
  int32_t idx;
};

inline bool ranks_before(const Cand& a, const Cand& b) { return a.z > b.z || (a.z == b.z && a.idx < b.idx); }

struct Workspace {
  std::vector<float> z;
  std::vector<float> buf;
  std::vector<Cand> cand;
  std::vector<Cand> sel;
  std::vector<double> hist;
};

// Mass histogram over d = max z - z: kNumBins bins of width 1/kBinScale for d < kBinRange, plus one
// bin for the rest. The bin index is monotone in z, so whole bins rank before or after each other.
constexpr int kNumBins = 4096;
constexpr float kBinScale = 128.f;
constexpr float kBinRange = kNumBins / kBinScale;

inline int bin_of(float zmax, float z) {
  const float d = zmax - z;
  return d < kBinRange ? static_cast<int>(d * kBinScale) : kNumBins;
}

struct Cut {
  bool keep_all = true;  // keep every candidate
  float vz = 0.f;        // otherwise: keep z > vz, plus the first `ties` candidates with z == vz
  int64_t ties = 0;
};

// Weighted quickselect: the smallest prefix of `sel` (in ranks_before order) whose mass reaches need.
Cut top_p_cut(std::vector<Cand>& sel, double need) {
  Cut cut;
  double acc = 0.0;
  int64_t lo = 0, hi = static_cast<int64_t>(sel.size());
  while (hi > lo) {
    const int64_t m = hi - lo;
    if (m <= 16) {
      std::sort(sel.begin() + lo, sel.begin() + hi, ranks_before);
      for (int64_t i = lo; i < hi; ++i) {
        acc += sel[i].e;
        if (acc >= need) {
          cut.keep_all = false;
          cut.vz = sel[i].z;
          cut.ties = 0;
          for (int64_t j = lo; j <= i; ++j) cut.ties += sel[j].z == cut.vz;
          return cut;
        }
      }
      // rounding left the whole set short of `need`: keep all of it (down to its smallest z)
      cut.keep_all = false;
      cut.vz = sel[hi - 1].z;
      cut.ties = 0;
      for (int64_t j = lo; j < hi; ++j) cut.ties += sel[j].z == cut.vz;
      return cut;
    }
    float a = sel[lo].z, b = sel[lo + m / 2].z, c = sel[hi - 1].z;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    int64_t lt = lo, i = lo, gt = hi;  // [lo,lt) > pivot, [lt,gt) == pivot, [gt,hi) < pivot
    while (i < gt) {
      if (sel[i].z > pivot) {
        std::swap(sel[lt++], sel[i++]);
      } else if (sel[i].z < pivot) {
        std::swap(sel[i], sel[--gt]);
      } else {
        ++i;
      }
    }
    double m_hi = 0.0;
    for (int64_t j = lo; j < lt; ++j) m_hi += sel[j].e;
    if (acc + m_hi >= need) {
      hi = lt;
      continue;
    }
    const double ee = sel[lt].e;  // equal z -> equal e
    const int64_t n_eq = gt - lt;
    double run = acc + m_hi;
    int64_t j = 0;
    while (j < n_eq) {
      run += ee;
      ++j;
      if (run >= need) break;
    }
    if (run >= need) {
      cut.keep_all = false;
      cut.vz = pivot;
      cut.ties = j;
      return cut;
    }
    if (gt == hi) {  // nothing smaller left: rounding kept us short of `need`, keep everything
      cut.keep_all = false;
      cut.vz = pivot;
      cut.ties = n_eq;
      return cut;
    }
    acc = run;
    lo = gt;
  }
  return cut;  // empty set (not reached: callers pass at least one candidate)
}

// Inverse-CDF draw over the tokens kept by `cut`, in token-id order, with fp64 running sums.
int64_t draw(const float* z, const float* e, int64_t V, const Cut& cut, double u) {
  auto kept = [&](int64_t i, int64_t& ties_left) {
    return cut.keep_all || z[i] > cut.vz || (z[i] == cut.vz && ties_left-- > 0);
  };
  double total = 0.0;
  int64_t ties_left = cut.ties;
  for (int64_t i = 0; i < V; ++i) {
    if (kept(i, ties_left)) total += e[i];
  }
  const double target = u * total;
  double acc = 0.0;
  int64_t last_positive = -1;
  ties_left = cut.ties;
  for (int64_t i = 0; i < V; ++i) {
    if (kept(i, ties_left)) {
      acc += e[i];
      if (e[i] > 0.f) last_positive = i;
      if (acc > target) return i;
    }
  }
  TORCH_CHECK(last_positive >= 0, "sample: kept no token with positive probability");
  return last_positive;
}

template <typename T>
int64_t sample_row(const T* l, int64_t V, float temp, int64_t top_k, float top_p, int64_t seed, int64_t row,
                   Workspace& ws) {
  auto argmax = [&]() -> int64_t {
    float best = to_f32(l[0]);
    int64_t arg = 0;
    for (int64_t i = 1; i < V; ++i) {
      const float v = to_f32(l[i]);
      if (v > best) {
        best = v;
        arg = i;
      }
    }
    return arg;
  };
  if (temp == 0.f) return argmax();
  float* z = ws.z.data();
  float zmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : zmax)
  for (int64_t i = 0; i < V; ++i) {
    z[i] = to_f32(l[i]) / temp;
    zmax = std::max(zmax, z[i]);
  }
  // logits / temperature overflowed fp32 (finite logits, tiny temperature): the T -> 0 limit.
  if (!std::isfinite(zmax)) return argmax();

  std::vector<Cand>& cand = ws.cand;
  cand.clear();
  double total_k = 0.0;  // mass of the top-k set (all tokens when top-k is off)
  const bool use_k = top_k > 0 && top_k < V;
  if (use_k) {
    float* buf = ws.buf.data();
    std::copy(z, z + V, buf);
    std::nth_element(buf, buf + (top_k - 1), buf + V, std::greater<float>());
    const float vk = buf[top_k - 1];
    int64_t gt = 0;
    for (int64_t i = 0; i < top_k - 1; ++i) gt += buf[i] > vk;
    int64_t ties_left = top_k - gt;
    for (int64_t i = 0; i < V; ++i) {
      if (z[i] > vk || (z[i] == vk && ties_left-- > 0)) {
        const float e = std::exp(z[i] - zmax);
        cand.push_back({z[i], e, static_cast<int32_t>(i)});
        total_k += e;
      }
    }
  } else {
    // no top-k: e for every token, and (for top-p) a mass histogram that leaves only the tokens of
    // one bin for the exact selection
    float* e = ws.buf.data();
    double s = 0.0;
    for (int64_t i = 0; i < V; ++i) {
      e[i] = std::exp(z[i] - zmax);
      s += e[i];
    }
    total_k = s;
    if (top_p < 1.f) {
      std::vector<double>& hist = ws.hist;
      hist.assign(kNumBins + 1, 0.0);
      for (int64_t i = 0; i < V; ++i) hist[bin_of(zmax, z[i])] += e[i];
      const double need = static_cast<double>(top_p) * s;
      double above = 0.0;
      int boundary = kNumBins;
      for (int b = 0; b <= kNumBins; ++b) {
        if (above + hist[b] >= need) {
          boundary = b;
          break;
        }
        if (b < kNumBins) above += hist[b];
      }
      ws.sel.clear();
      for (int64_t i = 0; i < V; ++i) {
        if (bin_of(zmax, z[i]) == boundary) ws.sel.push_back({z[i], e[i], static_cast<int32_t>(i)});
      }
      const Cut cut = top_p_cut(ws.sel, static_cast<double>(top_p) * s - above);
      return draw(z, e, V, cut, uniform_for(seed, row));
    }
    return draw(z, e, V, Cut{}, uniform_for(seed, row));
  }

  // top-k set in `cand` (token-id order); top-p cut inside it
  Cut cut;
  if (top_p < 1.f) {
    ws.sel.assign(cand.begin(), cand.end());
    cut = top_p_cut(ws.sel, static_cast<double>(top_p) * total_k);
  } else {
    cut.keep_all = true;
  }
  const double u = uniform_for(seed, row);
  double total = 0.0;
  {
    int64_t ties_left = cut.ties;
    for (const Cand& c : cand) {
      if (cut.keep_all || c.z > cut.vz || (c.z == cut.vz && ties_left-- > 0)) total += c.e;
    }
  }
  const double target = u * total;
  double acc = 0.0;
  int64_t last_positive = -1;
  int64_t ties_left = cut.ties;
  for (const Cand& c : cand) {
    if (cut.keep_all || c.z > cut.vz || (c.z == cut.vz && ties_left-- > 0)) {
      acc += c.e;
      if (c.e > 0.f) last_positive = c.idx;
      if (acc > target) return c.idx;
    }
  }
  TORCH_CHECK(last_positive >= 0, "sample: row ", row, " kept no token with positive probability");
  return last_positive;
}

}  // namespace

at::Tensor sample_cpu(const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k,
                      const at::Tensor& top_p, const at::Tensor& seeds) {
  TORCH_CHECK(logits_in.dim() == 2, "sample: logits must be [B, V], got ", logits_in.sizes());
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(V > 0, "sample: empty vocabulary");
  TORCH_CHECK(V <= std::numeric_limits<int32_t>::max(), "sample: vocabulary too large");
  for (const at::Tensor* t : {&temperature, &top_k, &top_p, &seeds}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "sample: temperature, top_k, top_p and seeds must be [B] = [", B,
                "], got ", t->sizes());
  }
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor tt = temperature.to(at::kFloat).contiguous();
  const at::Tensor kk = top_k.to(at::kLong).contiguous();
  const at::Tensor pp = top_p.to(at::kFloat).contiguous();
  const at::Tensor ss = seeds.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const float* tp = tt.data_ptr<float>();
  const int64_t* kp = kk.data_ptr<int64_t>();
  const float* ppp = pp.data_ptr<float>();
  const int64_t* sp = ss.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Workspace ws;
      ws.z.resize(V);
      ws.buf.resize(V);
      ws.cand.reserve(V);
      ws.sel.reserve(V);
      for (int64_t b = begin; b < end; ++b) {
        TORCH_CHECK(tp[b] >= 0.f && ppp[b] > 0.f && ppp[b] <= 1.f && kp[b] >= 0, "sample: row ", b,
                    " has out-of-range parameters (temperature ", tp[b], ", top_k ", kp[b], ", top_p ", ppp[b], ")");
        op[b] = sample_row<scalar_t>(lp + b * V, V, tp[b], kp[b], ppp[b], sp[b], b, ws);
      }
    });
  });
  return out;
}

}  // namespace preflexor
