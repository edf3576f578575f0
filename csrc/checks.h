// Input validation shared by the CPU and CUDA implementations of the dpt_engine ops. Every
// message names the argument (and the list index) and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace dpt {

// Elements per EMA work item: a chunk never spans two tensors, so a table of chunks over all
// tensors lets one parallel loop (CPU) or one launch (CUDA) cover the whole list evenly.
constexpr int64_t kEmaChunk = 1 << 16;

inline void check_ema_inputs(at::TensorList ema, at::TensorList params, double decay,
                             c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(ema.size() == params.size(), "ema_update_: ema has ", ema.size(), " tensors but params has ",
              params.size());
  TORCH_CHECK_VALUE(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0,
              "ema_update_: decay must be in [0, 1], got ", decay);
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(e.defined(), "ema_update_: ema[", i, "] is undefined");
    TORCH_CHECK_VALUE(p.defined(), "ema_update_: params[", i, "] is undefined");
    TORCH_CHECK(e.device().type() == device_type, "ema_update_: ema[", i, "] is on ", e.device(),
                ", expected a ", c10::DeviceTypeName(device_type), " tensor");
    TORCH_CHECK(p.device() == e.device(), "ema_update_: params[", i, "] is on ", p.device(), " but ema[", i,
                "] is on ", e.device());
    TORCH_CHECK_TYPE(e.scalar_type() == at::kFloat, "ema_update_: ema[", i, "] must be float32, got ",
                e.scalar_type());
    TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16, "ema_update_: params[", i,
                "] must be float32 or bfloat16, got ", p.scalar_type());
    TORCH_CHECK_VALUE(p.sizes() == e.sizes(), "ema_update_: params[", i, "] has shape ", p.sizes(), " but ema[", i,
                "] has shape ", e.sizes());
    TORCH_CHECK_VALUE(e.is_contiguous(), "ema_update_: ema[", i, "] must be contiguous (strides ", e.strides(), ")");
    TORCH_CHECK_VALUE(p.is_contiguous(), "ema_update_: params[", i, "] must be contiguous (strides ", p.strides(),
                ")");
    TORCH_CHECK_VALUE(e.numel() == 0 || e.data_ptr() != p.data_ptr(), "ema_update_: ema[", i,
                "] and params[", i, "] share memory");
  }
}

// dpm_solver_step_ (see kernels/_native.py for the semantics). Checks everything that is known on
// the host; the step index and the order column are read on the device by the CUDA kernel.
inline void check_solver_inputs(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& history,
                                const at::Tensor& table, const at::Tensor& step,
                                std::optional<double> guidance_scale, const at::Tensor& out,
                                c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.defined(), "dpm_solver_step_: x is undefined");
  TORCH_CHECK(x.device().type() == device_type, "dpm_solver_step_: x is on ", x.device(), ", expected a ",
              c10::DeviceTypeName(device_type), " tensor");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "dpm_solver_step_: x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), "dpm_solver_step_: x must be contiguous");
  const int64_t n = x.numel();

  const auto same_device = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.defined(), "dpm_solver_step_: ", name, " is undefined");
    TORCH_CHECK(t.device() == x.device(), "dpm_solver_step_: ", name, " is on ", t.device(), " but x is on ",
                x.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), "dpm_solver_step_: ", name, " must be contiguous");
  };

  same_device("model_out", model_out);
  const auto mt = model_out.scalar_type();
  TORCH_CHECK_TYPE(mt == at::kFloat || mt == at::kBFloat16 || mt == at::kHalf,
                   "dpm_solver_step_: model_out must be float32, bfloat16 or float16, got ", mt);
  if (guidance_scale.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*guidance_scale), "dpm_solver_step_: guidance_scale must be finite, got ",
                      *guidance_scale);
    TORCH_CHECK_VALUE(model_out.numel() == 2 * n, "dpm_solver_step_: with guidance_scale, model_out must be the "
                      "doubled batch [cond; uncond] of 2 x ", n, " elements, got ", model_out.numel(),
                      " (shape ", model_out.sizes(), ")");
  } else {
    TORCH_CHECK_VALUE(model_out.numel() == n, "dpm_solver_step_: model_out has ", model_out.numel(),
                      " elements but x has ", n, " (pass guidance_scale for a doubled guidance batch)");
  }

  same_device("history", history);
  TORCH_CHECK_TYPE(history.scalar_type() == at::kFloat, "dpm_solver_step_: history must be float32, got ",
                   history.scalar_type());
  TORCH_CHECK_VALUE(history.dim() == x.dim() + 1 && history.sizes().slice(1) == x.sizes() && history.size(0) >= 1,
                    "dpm_solver_step_: history must be (S, *x.shape) with x of shape ", x.sizes(), ", got ",
                    history.sizes());

  same_device("table", table);
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble,
                   "dpm_solver_step_: table must be float32 or float64, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == 7 && table.size(0) >= 1,
                    "dpm_solver_step_: table must be (steps, 7) (x_scale, c_cur, c_prev, c_prev2, inv_alpha, "
                    "sigma_over_alpha, order), got ", table.sizes());

  same_device("step", step);
  TORCH_CHECK_TYPE(step.scalar_type() == at::kInt || step.scalar_type() == at::kLong,
                   "dpm_solver_step_: step must be an int32 or int64 tensor, got ", step.scalar_type());
  TORCH_CHECK_VALUE(step.numel() == 1, "dpm_solver_step_: step must hold one element, got shape ", step.sizes());

  same_device("out", out);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "dpm_solver_step_: out must be float32, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), "dpm_solver_step_: out has shape ", out.sizes(), " but x has shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(!out.is_alias_of(history),
                    "dpm_solver_step_: out must not share memory with history");
}

// Host-side check of a step's order (the table's last column) against the ring buffer.
inline int64_t checked_order(double order_value, int64_t step, int64_t slots) {
  const auto order = static_cast<int64_t>(order_value);
  TORCH_CHECK_VALUE(static_cast<double>(order) == order_value && order >= 1 && order <= 3,
                    "dpm_solver_step_: table[", step, ", 6] (the order) must be 1, 2 or 3, got ", order_value);
  TORCH_CHECK_VALUE(order <= slots, "dpm_solver_step_: step ", step, " has order ", order, " but history has ",
                    slots, " slots");
  return order;
}

}  // namespace dpt
