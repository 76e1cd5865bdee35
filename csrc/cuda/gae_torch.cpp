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
