// KL penalty estimators on the GPU (torch-free): one thread per token, value
// and slope from the shared core formulas (core/kl_penalty.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/kl_penalty.h"
#include "launchers.h"

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

template <typename in_t, typename out_t>
cudaError_t launch_kl_penalty(const in_t* logprobs, const in_t* ref_logprobs, int64_t n, int kind, double clamp,
                              out_t* value, out_t* slope, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  kl_penalty_kernel<in_t, out_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      logprobs, ref_logprobs, n, kind, out_t(clamp), value, slope);
  return cudaGetLastError();
}

#define RLK_INSTANTIATE(in_t, out_t)                                                                        \
  template cudaError_t launch_kl_penalty<in_t, out_t>(const in_t*, const in_t*, int64_t, int, double, out_t*, \
                                                      out_t*, cudaStream_t);
RLK_INSTANTIATE(float, float)
RLK_INSTANTIATE(double, double)
RLK_INSTANTIATE(__half, float)
RLK_INSTANTIATE(__nv_bfloat16, float)
#undef RLK_INSTANTIATE

}  // namespace cuda
}  // namespace rlk
