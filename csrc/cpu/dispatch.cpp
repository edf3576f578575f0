// Run-time choice of the CPU loop build (kernels.h). Plain C++: compiled with default flags.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace dpt::cpu {
namespace {

bool cpu_has(const char* isa) {
  if (std::strcmp(isa, "default") == 0) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(DPT_HAVE_AVX2)
  if (std::strcmp(isa, "avx2") == 0) {
    // The copy is compiled with -march=x86-64-v3, so ask for the whole level where we can.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    return __builtin_cpu_supports("x86-64-v3");
#else
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
           __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
#endif
  }
#endif
#endif
  return false;
}

const KernelTable* table_for(const char* isa) {
  if (!cpu_has(isa)) return nullptr;
  if (std::strcmp(isa, "default") == 0) return &kernels_default();
#if defined(DPT_HAVE_AVX2)
  if (std::strcmp(isa, "avx2") == 0) return &kernels_avx2();
#endif
  return nullptr;
}

const KernelTable* best() {
  if (const KernelTable* t = table_for("avx2")) return t;
  return &kernels_default();
}

const KernelTable* initial() {
  const char* env = std::getenv("DPT_CPU_ISA");
  if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) {
    if (const KernelTable* t = table_for(env)) return t;
  }
  return best();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial()};
  return table;
}

}  // namespace

const KernelTable& active_kernels() { return *current().load(std::memory_order_acquire); }

bool set_kernels(const char* isa) {
  const KernelTable* t = std::strcmp(isa, "auto") == 0 ? best() : table_for(isa);
  if (t == nullptr) return false;
  current().store(t, std::memory_order_release);
  return true;
}

}  // namespace dpt::cpu
