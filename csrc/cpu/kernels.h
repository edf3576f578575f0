// Raw CPU loops behind the dpt_engine ops, free of ATen/c10 headers.
//
// The loops are compiled twice (kernels_default.cpp for the compiler's baseline target,
// kernels_avx2.cpp with -march=x86-64-v3) and the best table for the running CPU is chosen once
// at run time (dispatch.cpp). Only this plain C++ header crosses the boundary, so no inline
// torch/STL function is ever emitted with AVX2 instructions into code a baseline CPU might run.
#pragma once

#include <cstdint>

namespace dpt::cpu {

// ema[i] = lerp(ema[i], param[i], w) for i in [0, n): torch's lerp with a scalar weight,
// `w < 0.5 ? ema + w * (param - ema) : param - (param - ema) * (1 - w)` (a fused multiply-add in
// the AVX2 build, as torch's own vectorised lerp).
using EmaF32Fn = void (*)(float* ema, const float* param, int64_t n, float w);
using EmaBF16Fn = void (*)(float* ema, const uint16_t* param_bf16_bits, int64_t n, float w);

// One DPM-Solver++ multistep update over elements [begin, end) (see csrc/cpu/solver_step.cpp),
// in float32 with the eager code's operation order and no fused multiply-add in any build, so the
// result equals the eager PyTorch step bit for bit.
struct SolverArgs {
  const float* x;          // x_i
  const void* model_out;   // eps (float or bf16 bits); with guidance the conditional half
  int64_t uncond_offset;   // elements from a conditional eps value to its unconditional one
  const float* x0_prev;    // x0_{i-1} (order >= 2)
  const float* x0_prev2;   // x0_{i-2} (order 3)
  float* x0;               // out: x0_i (a history slot)
  float* x_next;           // out: x_{i+1} (may be x itself: element i is read before it is written)
  float x_scale, c_cur, c_prev, c_prev2, inv_alpha, sigma_over_alpha;
  float guidance_scale;    // w (read only when guided)
};
using SolverFn = void (*)(const SolverArgs& a, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;  // "default" | "avx2"
  EmaF32Fn ema_f32;
  EmaBF16Fn ema_bf16;
  // solver[model_out is bf16][guided][order - 1]
  SolverFn solver[2][2][3];
};

const KernelTable& kernels_default();
#if defined(DPT_HAVE_AVX2)
const KernelTable& kernels_avx2();
#endif

// The table in use: the best one this CPU runs, unless DPT_CPU_ISA=default|avx2 (read once) or
// set_kernels asks for another.
const KernelTable& active_kernels();
// Switch tables ("default", "avx2" or "auto"); false when this build or CPU lacks it.
bool set_kernels(const char* isa);

}  // namespace dpt::cpu
