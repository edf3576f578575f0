// CPU multi-tensor EMA update: dpt_engine::ema_update_(ema, params, decay).
//
//   ema[i] <- lerp(ema[i], params[i], w),  w = 1 - decay   (torch.lerp's two-branch formula)
//
// in float32 (bf16 params are widened exactly, so the result equals the reference's upcast-then-
// lerp). All tensors are cut into chunks of kEmaChunk elements (a chunk never spans two tensors);
// one at::parallel_for over the chunk table spreads the whole update over the intra-op threads, so
// a model of a thousand small tensors costs one fork/join, not one per tensor. The inner loops
// are in kernels_impl.h (vectorised by the compiler, one build per ISA).
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "kernels.h"

namespace dpt {
namespace {

struct EmaChunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

}  // namespace

void ema_update_cpu(at::TensorList ema, at::TensorList params, double decay) {
  check_ema_inputs(ema, params, decay, c10::DeviceType::CPU);
  const float w = static_cast<float>(1.0 - decay);  // the reference's weight, rounded the same way

  std::vector<EmaChunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < ema.size(); ++i) {
    const int64_t n = ema[i].numel();
    total += n;
    for (int64_t b = 0; b < n; b += kEmaChunk) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(n, b + kEmaChunk)});
    }
  }
  if (chunks.empty()) return;

  std::vector<float*> ema_ptr(ema.size());
  std::vector<const void*> param_ptr(ema.size());
  std::vector<bool> param_bf16(ema.size());
  for (size_t i = 0; i < ema.size(); ++i) {
    ema_ptr[i] = ema[i].data_ptr<float>();
    param_ptr[i] = params[i].const_data_ptr();
    param_bf16[i] = params[i].scalar_type() == at::kBFloat16;
  }

  const cpu::KernelTable& k = cpu::active_kernels();
  // Below ~4 chunks of work the fork/join costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (4 * kEmaChunk) / std::max<int64_t>(1, total / chunks.size()));
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const EmaChunk& ch = chunks[c];
      float* e = ema_ptr[ch.tensor] + ch.begin;
      const int64_t n = ch.end - ch.begin;
      if (param_bf16[ch.tensor]) {
        k.ema_bf16(e, static_cast<const uint16_t*>(param_ptr[ch.tensor]) + ch.begin, n, w);
      } else {
        k.ema_f32(e, static_cast<const float*>(param_ptr[ch.tensor]) + ch.begin, n, w);
      }
    }
  });
}

}  // namespace dpt

