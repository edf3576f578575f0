// CUDA DPM-Solver++ multistep update: dpt_engine::dpm_solver_step_ (maths and semantics in
// csrc/cpu/solver_step.cpp and kernels/solver_step.py's solver_step_reference):
//
//   eps = cond + w * (cond - uncond) (or model_out);  x0 = x * inv_alpha - eps * sigma_over_alpha
//   history[i % S] = x0;  out = x * x_scale + x0 * c_cur (+ history[(i-1) % S] * c_prev (+ ...))
//
// The step index i is a one-element int tensor on the device and the coefficient row (with the
// order in column 6) is read from the device table, so a sampling loop never syncs with the host
// and a step can be replayed in a CUDA graph. float32 arithmetic with the round-to-nearest
// intrinsics (no contraction into FMAs), in the eager code's order: the eager fp32 result to the
// bit. model_out may be fp32, bf16 or fp16. 16-byte vector accesses when everything is aligned.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"
#include "../ops.h"

namespace dpt {
namespace {

constexpr int kSolverThreads = 256;

struct SolverPtrs {
  const float* x;          // may equal out
  const void* model_out;   // cond half; uncond at + n
  float* history;          // (S, n)
  const void* table;       // (steps, 7) float or double
  const void* step;        // one int32 / int64
  float* out;
  int64_t n;
  int64_t slots;
  int64_t steps;
  float guidance_scale;
  bool table_double;
  bool step_int64;
  bool vec4;
};

template <typename In>
__device__ __forceinline__ float to_float(In v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename In>
__device__ __forceinline__ void load4(const In* p, int64_t v, float (&out)[4]) {
  if constexpr (sizeof(In) == 4) {
    const float4 r = __ldg(reinterpret_cast<const float4*>(p) + v);
    out[0] = r.x, out[1] = r.y, out[2] = r.z, out[3] = r.w;
  } else {
    const uint2 r = __ldg(reinterpret_cast<const uint2*>(p) + v);
    const In* h = reinterpret_cast<const In*>(&r);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = to_float(h[j]);
  }
}

struct Coefs {
  float x_scale, c_cur, c_prev, c_prev2, inv_alpha, sigma_over_alpha, w;
};

// One element, in the eager order, every operation rounded on its own (no FMA contraction).
template <bool Guided, int Order>
__device__ __forceinline__ void solve(float x, float cond, float uncond, float h1, float h2, const Coefs& c,
                                      float& x0, float& x_next) {
  float eps = cond;
  if constexpr (Guided) eps = __fadd_rn(cond, __fmul_rn(c.w, __fsub_rn(cond, uncond)));
  x0 = __fsub_rn(__fmul_rn(x, c.inv_alpha), __fmul_rn(eps, c.sigma_over_alpha));
  float acc = __fadd_rn(__fmul_rn(x, c.x_scale), __fmul_rn(x0, c.c_cur));
  if constexpr (Order >= 2) acc = __fadd_rn(acc, __fmul_rn(h1, c.c_prev));
  if constexpr (Order >= 3) acc = __fadd_rn(acc, __fmul_rn(h2, c.c_prev2));
  x_next = acc;
}

template <typename In, bool Guided, int Order>
__device__ __forceinline__ void step_body(const SolverPtrs& a, const Coefs& c, int64_t i) {
  const int64_t n = a.n, s = a.slots;
  float* x0o = a.history + (i % s) * n;
  const float* h1 = a.history + ((i + s - 1) % s) * n;
  const float* h2 = a.history + ((i + 2 * s - 2) % s) * n;
  const In* cond = static_cast<const In*>(a.model_out);
  const In* uncond = cond + n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSolverThreads;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kSolverThreads + threadIdx.x;
  int64_t done = 0;
  if (a.vec4) {
    const int64_t nvec = n / 4;
    for (int64_t v = start; v < nvec; v += stride) {
      float xv[4], cv[4], uv[4] = {0.f, 0.f, 0.f, 0.f}, p1[4] = {0.f, 0.f, 0.f, 0.f}, p2[4] = {0.f, 0.f, 0.f, 0.f};
      const float4 x4 = reinterpret_cast<const float4*>(a.x)[v];  // plain load: x may alias out
      xv[0] = x4.x, xv[1] = x4.y, xv[2] = x4.z, xv[3] = x4.w;
      load4(cond, v, cv);
      if constexpr (Guided) load4(uncond, v, uv);
      if constexpr (Order >= 2) load4(h1, v, p1);
      if constexpr (Order >= 3) load4(h2, v, p2);
      float x0[4], xn[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) solve<Guided, Order>(xv[j], cv[j], uv[j], p1[j], p2[j], c, x0[j], xn[j]);
      reinterpret_cast<float4*>(x0o)[v] = make_float4(x0[0], x0[1], x0[2], x0[3]);
      reinterpret_cast<float4*>(a.out)[v] = make_float4(xn[0], xn[1], xn[2], xn[3]);
    }
    done = nvec * 4;
  }
  for (int64_t e = done + start; e < n; e += stride) {
    const float u = Guided ? to_float(uncond[e]) : 0.f;
    const float p1 = Order >= 2 ? h1[e] : 0.f;
    const float p2 = Order >= 3 ? h2[e] : 0.f;
    float x0, xn;
    solve<Guided, Order>(a.x[e], to_float(cond[e]), u, p1, p2, c, x0, xn);
    x0o[e] = x0;
    a.out[e] = xn;
  }
}

template <typename T>
__device__ __forceinline__ float row_value(const void* table, int64_t i, int j) {
  return static_cast<float>(__ldg(static_cast<const T*>(table) + i * 7 + j));
}

template <typename In, bool Guided>
__global__ void __launch_bounds__(kSolverThreads) dpm_solver_step_kernel(SolverPtrs a) {
  // -- step index and coefficient row, read on the device (no host sync)
  const int64_t i = a.step_int64 ? __ldg(static_cast<const long long*>(a.step))
                                 : static_cast<int64_t>(__ldg(static_cast<const int*>(a.step)));
  CUDA_KERNEL_ASSERT(i >= 0 && i < a.steps && "dpm_solver_step_: step out of range");
  Coefs c;
  float order_f;
  if (a.table_double) {
    c = {row_value<double>(a.table, i, 0), row_value<double>(a.table, i, 1), row_value<double>(a.table, i, 2),
         row_value<double>(a.table, i, 3), row_value<double>(a.table, i, 4), row_value<double>(a.table, i, 5),
         a.guidance_scale};
    order_f = row_value<double>(a.table, i, 6);
  } else {
    c = {row_value<float>(a.table, i, 0), row_value<float>(a.table, i, 1), row_value<float>(a.table, i, 2),
         row_value<float>(a.table, i, 3), row_value<float>(a.table, i, 4), row_value<float>(a.table, i, 5),
         a.guidance_scale};
    order_f = row_value<float>(a.table, i, 6);
  }
  const int order = static_cast<int>(order_f);
  CUDA_KERNEL_ASSERT(order >= 1 && order <= 3 && order <= a.slots && "dpm_solver_step_: bad order for history");
  // -- elementwise update, specialised by order (uniform across the grid)
  switch (order) {
    case 1: step_body<In, Guided, 1>(a, c, i); break;
    case 2: step_body<In, Guided, 2>(a, c, i); break;
    default: step_body<In, Guided, 3>(a, c, i); break;
  }
}

template <typename In>
void launch(const SolverPtrs& a, bool guided, int blocks, cudaStream_t stream) {
  if (guided) {
    dpm_solver_step_kernel<In, true><<<blocks, kSolverThreads, 0, stream>>>(a);
  } else {
    dpm_solver_step_kernel<In, false><<<blocks, kSolverThreads, 0, stream>>>(a);
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int multiprocessor_count(c10::DeviceIndex device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

void dpm_solver_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& history,
                          const at::Tensor& table, const at::Tensor& step, std::optional<double> guidance_scale,
                          const at::Tensor& out) {
  check_solver_inputs(x, model_out, history, table, step, guidance_scale, out, c10::DeviceType::CUDA);
  const int64_t n = x.numel();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(x.device());

  SolverPtrs a{};
  a.x = x.const_data_ptr<float>();
  a.model_out = model_out.const_data_ptr();
  a.history = history.data_ptr<float>();
  a.table = table.const_data_ptr();
  a.step = step.const_data_ptr();
  a.out = out.data_ptr<float>();
  a.n = n;
  a.slots = history.size(0);
  a.steps = table.size(0);
  a.guidance_scale = static_cast<float>(guidance_scale.value_or(0.0));
  a.table_double = table.scalar_type() == at::kDouble;
  a.step_int64 = step.scalar_type() == at::kLong;
  a.vec4 = n % 4 == 0 && aligned(a.x, 16) && aligned(a.history, 16) && aligned(a.out, 16) &&
           aligned(a.model_out, 4 * model_out.element_size());

  const int64_t work = a.vec4 ? n / 4 : n;
  static const int64_t sms = multiprocessor_count(x.device().index());  // grid cap only
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((work + kSolverThreads - 1) / kSolverThreads, sms * 16)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool guided = guidance_scale.has_value();
  switch (model_out.scalar_type()) {
    case at::kFloat: launch<float>(a, guided, blocks, stream); break;
    case at::kBFloat16: launch<__nv_bfloat16>(a, guided, blocks, stream); break;
    default: launch<__half>(a, guided, blocks, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dpt
