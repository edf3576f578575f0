// AVX2 + FMA build of the CPU loops (compiled with -march=x86-64-v3, used only when the CPU has
// them; see dispatch.cpp).
#define DPT_KERNEL_NS isa_avx2
#define DPT_KERNEL_ISA_NAME "avx2"
#define DPT_USE_FMA 1
#include "kernels_impl.h"

namespace dpt::cpu {
const KernelTable& kernels_avx2() { return isa_avx2::table(); }
}  // namespace dpt::cpu
