// Baseline build of the CPU loops (the compiler's default target, e.g. x86-64 / SSE2, or
// aarch64): no fused multiply-add, so results match torch's non-FMA (DEFAULT capability) path.
#define DPT_KERNEL_NS isa_default
#define DPT_KERNEL_ISA_NAME "default"
#define DPT_USE_FMA 0
#include "kernels_impl.h"

namespace dpt::cpu {
const KernelTable& kernels_default() { return isa_default::table(); }
}  // namespace dpt::cpu
