// Host entry points of the dpt_engine operators (schemas and registration: ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace dpt {

void ema_update_cpu(at::TensorList ema, at::TensorList params, double decay);
void dpm_solver_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& history,
                         const at::Tensor& table, const at::Tensor& step, std::optional<double> guidance_scale,
                         const at::Tensor& out);

#if defined(DPT_WITH_CUDA)
void ema_update_cuda(at::TensorList ema, at::TensorList params, double decay);
void dpm_solver_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& history,
                          const at::Tensor& table, const at::Tensor& step, std::optional<double> guidance_scale,
                          const at::Tensor& out);
#endif

}  // namespace dpt
