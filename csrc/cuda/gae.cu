// GAE and discounted returns on the GPU: one thread per row running the
// shared core recurrence.  Rollout batches have many rows; each thread walks
// its own row backwards.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/gae.h"
#include "launchers.h"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename in_t, typename out_t>
__global__ void gae_kernel(const in_t* __restrict__ rewards, const in_t* __restrict__ values,
                           const uint8_t* __restrict__ mask, const uint8_t* __restrict__ dones,
                           const out_t* __restrict__ last_values, int64_t B, int64_t T, out_t gamma,
                           out_t lam, out_t* __restrict__ advantages, out_t* __restrict__ returns) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  gae_row<in_t, out_t, out_t>(rewards + o, values + o, mask ? mask + o : nullptr,
                              dones ? dones + o : nullptr, last_values ? last_values[b] : out_t(0), T,
                              gamma, lam, advantages + o, returns + o);
}

template <typename in_t, typename out_t>
__global__ void discounted_returns_kernel(const in_t* __restrict__ rewards,
                                          const uint8_t* __restrict__ mask,
                                          const uint8_t* __restrict__ dones, int64_t B, int64_t T,
                                          out_t gamma, out_t* __restrict__ returns) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  discounted_returns_row<in_t, out_t, out_t>(rewards + o, mask ? mask + o : nullptr,
                                             dones ? dones + o : nullptr, T, gamma, returns + o);
}

unsigned int blocks_for(int64_t rows) { return static_cast<unsigned int>((rows + kThreads - 1) / kThreads); }

}  // namespace

template <typename in_t, typename out_t>
cudaError_t launch_gae(const in_t* rewards, const in_t* values, const uint8_t* mask,
                       const uint8_t* dones, const out_t* last_values, int64_t B, int64_t T,
                       double gamma, double lam, out_t* advantages, out_t* returns,
                       cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  gae_kernel<in_t, out_t><<<blocks_for(B), kThreads, 0, stream>>>(
      rewards, values, mask, dones, last_values, B, T, out_t(gamma), out_t(lam), advantages, returns);
  return cudaGetLastError();
}

template <typename in_t, typename out_t>
cudaError_t launch_discounted_returns(const in_t* rewards, const uint8_t* mask, const uint8_t* dones,
                                      int64_t B, int64_t T, double gamma, out_t* returns,
                                      cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  discounted_returns_kernel<in_t, out_t><<<blocks_for(B), kThreads, 0, stream>>>(
      rewards, mask, dones, B, T, out_t(gamma), returns);
  return cudaGetLastError();
}

#define RLK_INSTANTIATE(in_t, out_t)                                                              \
  template cudaError_t launch_gae<in_t, out_t>(const in_t*, const in_t*, const uint8_t*,          \
                                               const uint8_t*, const out_t*, int64_t, int64_t,    \
                                               double, double, out_t*, out_t*, cudaStream_t);     \
  template cudaError_t launch_discounted_returns<in_t, out_t>(const in_t*, const uint8_t*,        \
                                                              const uint8_t*, int64_t, int64_t,   \
                                                              double, out_t*, cudaStream_t);
RLK_INSTANTIATE(float, float)
RLK_INSTANTIATE(double, double)
RLK_INSTANTIATE(__half, float)
RLK_INSTANTIATE(__nv_bfloat16, float)
#undef RLK_INSTANTIATE

}  // namespace cuda
}  // namespace rlk
