// Run-time CPU feature detection for the ISA paths of the CPU kernels (see cpu_isa.h).
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace preflexor {
namespace {

Isa detect() {
#ifdef PREFLEXOR_X86
  __builtin_cpu_init();
  const bool fma = __builtin_cpu_supports("fma");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && fma)
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && fma) return Isa::Avx2;
#endif
  return Isa::Generic;
}

std::atomic<int64_t>& active() {
  static std::atomic<int64_t> level{static_cast<int64_t>(native_isa())};
  return level;
}

}  // namespace

Isa native_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

void set_active_isa(int64_t level) {
  const int64_t native = static_cast<int64_t>(native_isa());
  TORCH_CHECK(level >= 0 && level <= 2, "set_cpu_isa: level must be 0 (generic), 1 (avx2) or 2 (avx512), got ",
              level);
  TORCH_CHECK(level <= native, "set_cpu_isa: this CPU's highest path is ", isa_name(native_isa()), "; cannot run ",
              isa_name(static_cast<Isa>(level)));
  active().store(level, std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

int64_t cpu_isa_native_op() { return static_cast<int64_t>(native_isa()); }
int64_t cpu_isa_active_op() { return static_cast<int64_t>(active_isa()); }
int64_t set_cpu_isa_op(int64_t level) {
  set_active_isa(level);
  return static_cast<int64_t>(active_isa());
}

}  // namespace preflexor
