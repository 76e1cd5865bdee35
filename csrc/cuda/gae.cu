// GAE and discounted returns on the GPU: one thread per row running the
// shared core recurrence.  Rollout batches have many rows; each thread walks
// its own row backwards.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/gae.h"
#include "dispatch.cuh"

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

cudaError_t launch_gae(const GaeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    gae_kernel<in_t, out_t><<<blocks_for(p.B), kThreads, 0, stream>>>(
        static_cast<const in_t*>(p.rewards), static_cast<const in_t*>(p.values), p.mask, p.dones,
        static_cast<const out_t*>(p.last_values), p.B, p.T, out_t(p.gamma), out_t(p.lam),
        static_cast<out_t*>(p.advantages), static_cast<out_t*>(p.returns));
  });
}

cudaError_t launch_discounted_returns(const GaeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    discounted_returns_kernel<in_t, out_t><<<blocks_for(p.B), kThreads, 0, stream>>>(
        static_cast<const in_t*>(p.rewards), p.mask, p.dones, p.B, p.T, out_t(p.gamma),
        static_cast<out_t*>(p.returns));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/gae.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/gae.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& dones,
                                            const c10::optional<at::Tensor>& last_values,
                                            double gamma, double lam) {
  c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor advantages, returns;
  const GaeParams p = gae_args(rewards, values, mask, dones, last_values, gamma, lam, advantages, returns);
  C10_CUDA_CHECK(cuda::launch_gae(p, current_stream()));
  return {advantages, returns};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& dones, double gamma) {
  c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor returns;
  const GaeParams p = discounted_returns_args(rewards, mask, dones, gamma, returns);
  C10_CUDA_CHECK(cuda::launch_discounted_returns(p, current_stream()));
  return returns;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("gae", &rlk::gae_cuda);
  m.impl("discounted_returns", &rlk::discounted_returns_cuda);
}
#endif  // TORCH_EXTENSION_NAME
