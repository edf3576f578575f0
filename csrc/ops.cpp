// Schemas and registrations of the dpt_engine operators (the only file including
// torch/library.h). Kernels: csrc/cpu/*.cpp (CPU key), csrc/cuda/*.cu (CUDA key, when built with
// DPT_WITH_CUDA). Fake (meta) implementations and Python wrappers: kernels/_native.py.
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "ops.h"

namespace {

// Which build of the CPU loops runs ("default" | "avx2"); a non-empty `request`
// switches first ("auto" = the best this CPU supports). For tests and benchmarks.
std::string cpu_isa(const std::string& request) {
  if (!request.empty()) {
    TORCH_CHECK(dpt::cpu::set_kernels(request.c_str()), "cpu_isa: '", request,
                "' is not available (this build or CPU lacks it); use default, avx2 or auto");
  }
  return dpt::cpu::active_kernels().isa;
}

bool built_with_cuda() {
#if defined(DPT_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(dpt_engine, m) {
  m.set_python_module("dpt_engine.kernels._native");
  // In place: ema[i] <- lerp(ema[i], params[i], 1 - decay) for every i, in one call.
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] params, float decay) -> ()");
  // One DPM-Solver++ multistep update x_i -> out = x_{i+1}, writing x0_i into history[i % S]
  // (kernels/solver_step.py's solver_step_reference; see kernels/_native.py).
  m.def(
      "dpm_solver_step_(Tensor x, Tensor model_out, Tensor(a!) history, Tensor table, Tensor step, "
      "float? guidance_scale, Tensor(b!) out) -> ()");
  m.def("cpu_isa(str request=\"\") -> str", &cpu_isa);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

TORCH_LIBRARY_IMPL(dpt_engine, CPU, m) {
  m.impl("ema_update_", &dpt::ema_update_cpu);
  m.impl("dpm_solver_step_", &dpt::dpm_solver_step_cpu);
}

#if defined(DPT_WITH_CUDA)
TORCH_LIBRARY_IMPL(dpt_engine, CUDA, m) {
  m.impl("ema_update_", &dpt::ema_update_cuda);
  m.impl("dpm_solver_step_", &dpt::dpm_solver_step_cuda);
}
#endif
