// CPU instruction-set levels of the extension's kernels, detected once, lowered on request.
//
// Every CPU kernel with ISA-specific code has three paths: AVX-512 (F, BW, VL, DQ + FMA), AVX2 + FMA, and
// a portable one (plain C++ the compiler vectorises for the build's baseline: SSE2 on x86-64, NEON on
// aarch64). The paths are compiled side by side with function target attributes, so one build runs on
// any CPU; `active_isa()` picks the path at run time. `set_active_isa(level)` lowers it (the Python side
// does so for PREFLEXOR_CPU_ISA), so a machine can run every path at or below its own; asking for a level
// above the CPU's is an error. -DPREFLEXOR_PORTABLE_ONLY builds the portable path alone, as on a non-x86
// CPU (`make check-portable` compiles the sources that way).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PREFLEXOR_PORTABLE_ONLY)
#define PREFLEXOR_X86 1
#include <immintrin.h>
// Function attributes that compile one function for one ISA (callers check active_isa() first).
#define PREFLEXOR_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define PREFLEXOR_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PREFLEXOR_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PREFLEXOR_ALWAYS_INLINE inline
#endif

namespace preflexor {

enum class Isa : int64_t { Generic = 0, Avx2 = 1, Avx512 = 2 };

Isa native_isa();                 // the highest level this CPU runs (detected once)
Isa active_isa();                 // the level the kernels use now (native unless lowered)
void set_active_isa(int64_t level);  // 0 generic, 1 avx2, 2 avx512; above native_isa() -> error
const char* isa_name(Isa isa);

int64_t cpu_isa_native_op();
int64_t cpu_isa_active_op();
int64_t set_cpu_isa_op(int64_t level);

}  // namespace preflexor

// Three copies of `impl<scalar_t>(args...)`, one per ISA, and `name<scalar_t>(args...)` that calls the
// copy of the active level. `impl` must be an always-inline template so each copy is vectorised for its
// own target.
#ifdef PREFLEXOR_X86
#define PREFLEXOR_ISA_VARIANTS(name, impl)                                                              \
  template <typename scalar_t, typename... Args>                                                       \
  PREFLEXOR_TARGET_AVX512 void name##_avx512(Args... args) { impl<scalar_t>(args...); }                \
  template <typename scalar_t, typename... Args>                                                       \
  PREFLEXOR_TARGET_AVX2 void name##_avx2(Args... args) { impl<scalar_t>(args...); }                    \
  template <typename scalar_t, typename... Args>                                                       \
  void name##_generic(Args... args) { impl<scalar_t>(args...); }                                       \
  template <typename scalar_t, typename... Args>                                                       \
  void name(Args... args) {                                                                            \
    switch (::preflexor::active_isa()) {                                                               \
      case ::preflexor::Isa::Avx512: return name##_avx512<scalar_t>(args...);                          \
      case ::preflexor::Isa::Avx2: return name##_avx2<scalar_t>(args...);                              \
      default: return name##_generic<scalar_t>(args...);                                              \
    }                                                                                                  \
  }
#else
#define PREFLEXOR_ISA_VARIANTS(name, impl)                                                              \
  template <typename scalar_t, typename... Args>                                                       \
  void name(Args... args) { impl<scalar_t>(args...); }
#endif
