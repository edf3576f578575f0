// CPU DPM-Solver++ multistep update: dpt_engine::dpm_solver_step_(x, model_out, history, table,
// step, guidance_scale, out). One pass over x (kernels/solver_step.py, solver_step_reference):
//
//   i       = step (a one-element int tensor),   S = history.size(0),   row = table[i]
//   eps     = model_out                                  (guidance_scale None)
//           = cond + w * (cond - uncond)                 (model_out = [cond; uncond], 2 x numel(x))
//   x0      = x * inv_alpha - eps * sigma_over_alpha     -> history[i % S]
//   out     = x * x_scale + x0 * c_cur + history[(i-1) % S] * c_prev + history[(i-2) % S] * c_prev2
//                                                        (the first row[6] = order terms)
//
// Reads x, model_out (1 or 2 x numel(x)) and order - 1 history slots, writes out and one history
// slot: 4-6 x 4 bytes per element where the eager step moves ~10 tensors' worth. float32
// arithmetic in the eager code's operation order without fused multiply-adds, so the result is
// the eager step's to the bit. `out` may be `x` (in-place update).
#include <ATen/Parallel.h>

#include "../checks.h"
#include "../ops.h"
#include "kernels.h"

namespace dpt {
namespace {

constexpr int64_t kSolverGrain = 1 << 15;

template <typename T>
void read_row(const at::Tensor& table, int64_t step, double (&row)[7]) {
  const T* r = table.const_data_ptr<T>() + step * 7;
  for (int j = 0; j < 7; ++j) row[j] = static_cast<double>(r[j]);
}

}  // namespace

void dpm_solver_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& history,
                         const at::Tensor& table, const at::Tensor& step, std::optional<double> guidance_scale,
                         const at::Tensor& out) {
  check_solver_inputs(x, model_out, history, table, step, guidance_scale, out, c10::DeviceType::CPU);
  const int64_t i = step.scalar_type() == at::kInt ? *step.const_data_ptr<int32_t>() : *step.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(i >= 0 && i < table.size(0), "dpm_solver_step_: step ", i, " is out of range for a table of ",
                    table.size(0), " steps");
  double row[7];
  if (table.scalar_type() == at::kDouble) {
    read_row<double>(table, i, row);
  } else {
    read_row<float>(table, i, row);
  }
  const int64_t slots = history.size(0);
  const int64_t order = checked_order(row[6], i, slots);
  const int64_t n = x.numel();
  if (n == 0) return;

  // float16 has no vector loop on CPU: widen it once (bfloat16 and float32 are read directly).
  const at::Tensor eps = model_out.scalar_type() == at::kHalf ? model_out.to(at::kFloat) : model_out;
  float* hist = history.data_ptr<float>();
  const auto slot = [&](int64_t back) { return hist + ((i - back) % slots + slots) % slots * n; };

  cpu::SolverArgs a{};
  a.x = x.const_data_ptr<float>();
  a.model_out = eps.const_data_ptr();
  a.uncond_offset = guidance_scale.has_value() ? n : 0;
  a.x0 = slot(0);
  a.x0_prev = order >= 2 ? slot(1) : nullptr;
  a.x0_prev2 = order >= 3 ? slot(2) : nullptr;
  a.x_next = out.data_ptr<float>();
  // Python floats meet float32 tensors as float32 scalars in the eager step: round the same way.
  a.x_scale = static_cast<float>(row[0]);
  a.c_cur = static_cast<float>(row[1]);
  a.c_prev = static_cast<float>(row[2]);
  a.c_prev2 = static_cast<float>(row[3]);
  a.inv_alpha = static_cast<float>(row[4]);
  a.sigma_over_alpha = static_cast<float>(row[5]);
  a.guidance_scale = static_cast<float>(guidance_scale.value_or(0.0));

  const bool bf16 = eps.scalar_type() == at::kBFloat16;
  const cpu::SolverFn fn = cpu::active_kernels().solver[bf16][guidance_scale.has_value()][order - 1];
  at::parallel_for(0, n, kSolverGrain, [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
}

}  // namespace dpt
