// CUDA multi-tensor EMA update: dpt_engine::ema_update_(ema, params, decay).
//
//   ema[i] <- lerp(ema[i], params[i], w),  w = 1 - decay   (torch.lerp's two-branch formula, fp32)
//
// One launch covers every tensor: the host writes a table of (ema pointer, param pointer, numel,
// param dtype) per tensor and (tensor, first element) per chunk of kEmaChunk elements into pinned
// memory, copies it to the device asynchronously (no host sync; the caching host allocator keeps
// the buffer alive until the copy has run) and launches one block per chunk. Blocks read 16-byte
// vectors (4 fp32 EMA values, 4 fp32 or bf16 params) when the tensors are aligned. Bytes per
// element: 12 (fp32 params) or 10 (bf16).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../checks.h"
#include "../ops.h"

namespace dpt {
namespace {

constexpr int kEmaThreads = 256;
constexpr int kMetaPerTensor = 4;  // ema ptr, param ptr, numel, param is bf16
constexpr int kMetaPerChunk = 2;   // tensor index, first element

__device__ __forceinline__ float lerp_w(float e, float p, float w) {
  // torch's lerp (ATen/native/Lerp.h)
  return w < 0.5f ? fmaf(w, p - e, e) : fmaf(w - 1.0f, p - e, p);
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }

template <bool Bf16>
__device__ __forceinline__ void ema_range(float* __restrict__ ema, const void* __restrict__ param, int64_t n,
                                          float w) {
  const int64_t tid = threadIdx.x;
  const bool aligned = (reinterpret_cast<uintptr_t>(ema) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(param) % (Bf16 ? 8 : 16) == 0);
  int64_t done = 0;
  if (aligned) {
    const int64_t nvec = n / 4;
    float4* e4 = reinterpret_cast<float4*>(ema);
    for (int64_t v = tid; v < nvec; v += kEmaThreads) {
      float4 e = e4[v];
      float p[4];
      if constexpr (Bf16) {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(param) + v);
        p[0] = bf16_bits_to_float(raw.x & 0xffffu);
        p[1] = bf16_bits_to_float(raw.x >> 16);
        p[2] = bf16_bits_to_float(raw.y & 0xffffu);
        p[3] = bf16_bits_to_float(raw.y >> 16);
      } else {
        const float4 raw = __ldg(reinterpret_cast<const float4*>(param) + v);
        p[0] = raw.x, p[1] = raw.y, p[2] = raw.z, p[3] = raw.w;
      }
      e.x = lerp_w(e.x, p[0], w);
      e.y = lerp_w(e.y, p[1], w);
      e.z = lerp_w(e.z, p[2], w);
      e.w = lerp_w(e.w, p[3], w);
      e4[v] = e;
    }
    done = nvec * 4;
  }
  for (int64_t i = done + tid; i < n; i += kEmaThreads) {
    float p;
    if constexpr (Bf16) {
      p = bf16_bits_to_float(reinterpret_cast<const uint16_t*>(param)[i]);
    } else {
      p = reinterpret_cast<const float*>(param)[i];
    }
    ema[i] = lerp_w(ema[i], p, w);
  }
}

// meta: [num_tensors x (ema, param, numel, is_bf16)] [num_chunks x (tensor, begin)]; one block per chunk.
__global__ void __launch_bounds__(kEmaThreads)
    ema_multi_tensor_kernel(const int64_t* __restrict__ meta, int64_t num_tensors, float w) {
  const int64_t* chunk = meta + kMetaPerTensor * num_tensors + kMetaPerChunk * static_cast<int64_t>(blockIdx.x);
  const int64_t t = chunk[0];
  const int64_t begin = chunk[1];
  const int64_t* tm = meta + kMetaPerTensor * t;
  const int64_t numel = tm[2];
  const int64_t n = min(kEmaChunk, numel - begin);
  float* ema = reinterpret_cast<float*>(tm[0]) + begin;
  if (tm[3]) {
    ema_range<true>(ema, reinterpret_cast<const uint16_t*>(tm[1]) + begin, n, w);
  } else {
    ema_range<false>(ema, reinterpret_cast<const float*>(tm[1]) + begin, n, w);
  }
}

}  // namespace

void ema_update_cuda(at::TensorList ema, at::TensorList params, double decay) {
  check_ema_inputs(ema, params, decay, c10::DeviceType::CUDA);
  if (ema.empty()) return;
  const c10::Device device = ema[0].device();
  for (size_t i = 1; i < ema.size(); ++i) {
    TORCH_CHECK(ema[i].device() == device, "ema_update_: ema[", i, "] is on ", ema[i].device(),
                " but ema[0] is on ", device, "; call once per device");
  }
  const float w = static_cast<float>(1.0 - decay);

  int64_t num_chunks = 0;
  for (const at::Tensor& e : ema) num_chunks += (e.numel() + kEmaChunk - 1) / kEmaChunk;
  if (num_chunks == 0) return;
  TORCH_CHECK(num_chunks < (int64_t{1} << 31), "ema_update_: too many elements for one launch");

  const int64_t num_tensors = static_cast<int64_t>(ema.size());
  const int64_t meta_len = kMetaPerTensor * num_tensors + kMetaPerChunk * num_chunks;
  at::Tensor host = at::empty({meta_len}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t* hc = h + kMetaPerTensor * num_tensors;
  for (int64_t i = 0; i < num_tensors; ++i) {
    const int64_t n = ema[i].numel();
    h[kMetaPerTensor * i + 0] = reinterpret_cast<int64_t>(ema[i].data_ptr());
    h[kMetaPerTensor * i + 1] = reinterpret_cast<int64_t>(params[i].const_data_ptr());
    h[kMetaPerTensor * i + 2] = n;
    h[kMetaPerTensor * i + 3] = params[i].scalar_type() == at::kBFloat16;
    for (int64_t b = 0; b < n; b += kEmaChunk) {
      *hc++ = i;
      *hc++ = b;
    }
  }

  c10::cuda::CUDAGuard guard(device);
  const at::Tensor meta = host.to(device, /*non_blocking=*/true);  // async H2D on the current stream
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ema_multi_tensor_kernel<<<static_cast<unsigned>(num_chunks), kEmaThreads, 0, stream>>>(
      meta.const_data_ptr<int64_t>(), num_tensors, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dpt

