// The loops of kernels.h, included once per ISA translation unit with DPT_KERNEL_NS and
// DPT_USE_FMA defined. Deliberately uses no STL or torch headers (see kernels.h) and only
// internal-linkage functions, so each ISA's copies stay inside its own object file.
//
// Every file including this is compiled with -ffp-contract=off: a fused multiply-add happens
// exactly where fma() is written (the EMA's lerp, fused with DPT_USE_FMA as torch's vectorised
// lerp is), so a build's rounding does not depend on the compiler's contraction choices.
#include <cstdint>

#include "kernels.h"

#ifndef DPT_KERNEL_NS
#error "define DPT_KERNEL_NS before including kernels_impl.h"
#endif

namespace dpt::cpu::DPT_KERNEL_NS {
namespace {

#if DPT_USE_FMA
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
inline float fma(float a, float b, float c) { return a * b + c; }
#endif

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

template <typename In>
inline float load(const In* p, int64_t i) {
  if constexpr (sizeof(In) == 2) {
    return bf16_to_float(p[i]);
  } else {
    return p[i];
  }
}

// torch's lerp (ATen/native/Lerp.h): two formulas so that w = 1 gives `param` exactly.
template <typename In>
void ema_loop(float* __restrict__ ema, const In* __restrict__ param, int64_t n, float w) {
  if (w < 0.5f) {
    for (int64_t i = 0; i < n; ++i) {
      const float e = ema[i];
      ema[i] = fma(w, load(param, i) - e, e);
    }
  } else {
    const float wm1 = w - 1.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float p = load(param, i);
      ema[i] = fma(wm1, p - ema[i], p);
    }
  }
}

void ema_f32(float* ema, const float* param, int64_t n, float w) { ema_loop(ema, param, n, w); }
void ema_bf16(float* ema, const uint16_t* param, int64_t n, float w) { ema_loop(ema, param, n, w); }

// The eager step (kernels/solver_step.py: solver_step_reference), one rounding per operation in
// the same order, never fused:
//   eps    = cond + w * (cond - uncond)          (guided; else eps = model_out)
//   x0     = x * inv_alpha - eps * sigma_over_alpha
//   x_next = ((x * x_scale + x0 * c_cur) + x0_prev * c_prev) + x0_prev2 * c_prev2   (first `Order` terms)
template <typename In, bool Guided, int Order>
void solver_loop(const SolverArgs& a, int64_t begin, int64_t end) {
  const float* x = a.x;  // may alias x_next (same index only), so not __restrict__
  const In* __restrict__ out = static_cast<const In*>(a.model_out);
  const In* __restrict__ unc = out + a.uncond_offset;
  const float* __restrict__ p1 = a.x0_prev;
  const float* __restrict__ p2 = a.x0_prev2;
  float* __restrict__ x0o = a.x0;
  float* xn = a.x_next;
  const float xs = a.x_scale, cc = a.c_cur, cp = a.c_prev, cp2 = a.c_prev2;
  const float ia = a.inv_alpha, soa = a.sigma_over_alpha, w = a.guidance_scale;
  if (x == xn) {
    // In place: with one pointer for both, the compiler sees the same-index read-then-write.
    for (int64_t i = begin; i < end; ++i) {
      float eps = load(out, i);
      if constexpr (Guided) eps = eps + w * (eps - load(unc, i));
      const float xi = xn[i];
      const float x0 = xi * ia - eps * soa;
      float acc = xi * xs + x0 * cc;
      if constexpr (Order >= 2) acc = acc + p1[i] * cp;
      if constexpr (Order >= 3) acc = acc + p2[i] * cp2;
      x0o[i] = x0;
      xn[i] = acc;
    }
    return;
  }
  const float* __restrict__ xr = x;
  float* __restrict__ xw = xn;
  for (int64_t i = begin; i < end; ++i) {
    float eps = load(out, i);
    if constexpr (Guided) eps = eps + w * (eps - load(unc, i));
    const float xi = xr[i];
    const float x0 = xi * ia - eps * soa;
    float acc = xi * xs + x0 * cc;
    if constexpr (Order >= 2) acc = acc + p1[i] * cp;
    if constexpr (Order >= 3) acc = acc + p2[i] * cp2;
    x0o[i] = x0;
    xw[i] = acc;
  }
}

template <typename In, bool Guided>
constexpr SolverFn solver_entry(int order) {
  return order == 1   ? &solver_loop<In, Guided, 1>
         : order == 2 ? &solver_loop<In, Guided, 2>
                      : &solver_loop<In, Guided, 3>;
}

}  // namespace

const KernelTable& table() {
  static const KernelTable t = {
      DPT_KERNEL_ISA_NAME,
      &ema_f32,
      &ema_bf16,
      {{{solver_entry<float, false>(1), solver_entry<float, false>(2), solver_entry<float, false>(3)},
        {solver_entry<float, true>(1), solver_entry<float, true>(2), solver_entry<float, true>(3)}},
       {{solver_entry<uint16_t, false>(1), solver_entry<uint16_t, false>(2),
         solver_entry<uint16_t, false>(3)},
        {solver_entry<uint16_t, true>(1), solver_entry<uint16_t, true>(2),
         solver_entry<uint16_t, true>(3)}}},
  };
  return t;
}

}  // namespace dpt::cpu::DPT_KERNEL_NS
