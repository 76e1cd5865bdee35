// KL penalty estimators on the GPU (torch-free): one thread per token, value
// and slope from the shared core formulas (core/kl_penalty.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/kl_penalty.h"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename in_t, typename out_t>
__global__ void kl_penalty_kernel(const in_t* __restrict__ logprobs, const in_t* __restrict__ ref_logprobs,
                                  int64_t n, int kind, out_t clamp, out_t* __restrict__ value,
                                  out_t* __restrict__ slope) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    kl_penalty_element<out_t>(cast<out_t>(logprobs[i]), cast<out_t>(ref_logprobs[i]), kind, clamp, value + i,
                              slope + i);
}

}  // namespace

cudaError_t launch_kl_penalty(const KlPenaltyParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  int64_t blocks = (p.n + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    kl_penalty_kernel<in_t, out_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        static_cast<const in_t*>(p.logprobs), static_cast<const in_t*>(p.ref_logprobs), p.n, p.kind,
        out_t(p.clamp), static_cast<out_t*>(p.value), static_cast<out_t*>(p.slope));
  });
}

}  // namespace cuda
}  // namespace rlk
