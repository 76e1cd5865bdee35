#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../core/common.h"
#include "../args/advantages.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& dones,
                                            const c10::optional<at::Tensor>& last_values,
                                            double gamma, double lam) {
  const RolloutArgs args = check_rollout(rewards, values, mask, dones);
  check_last_values(args, rewards, last_values);
  const int64_t B = args.B, T = args.T;
  const uint8_t* mask_p = args.mask;
  const uint8_t* dones_p = args.dones;
  const auto out_dtype = args.out_dtype;
  c10::cuda::CUDAGuard guard(rewards.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  auto advantages = at::empty({B, T}, rewards.options().dtype(out_dtype));
  auto returns = at::empty({B, T}, rewards.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_gae(cuda::dptr(rewards.data_ptr<scalar_t>()),
                                    cuda::dptr(values.data_ptr<scalar_t>()), mask_p, dones_p,
                                    last_values.has_value() ? last_values->data_ptr<acc>() : nullptr,
                                    B, T, gamma, lam, advantages.data_ptr<acc>(),
                                    returns.data_ptr<acc>(), stream));
  });
  return {advantages, returns};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& dones, double gamma) {
  const RolloutArgs args = check_rollout(rewards, c10::nullopt, mask, dones);
  const int64_t B = args.B, T = args.T;
  const uint8_t* mask_p = args.mask;
  const uint8_t* dones_p = args.dones;
  c10::cuda::CUDAGuard guard(rewards.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  auto returns = at::empty({B, T}, rewards.options().dtype(args.out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "discounted_returns_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_discounted_returns(cuda::dptr(rewards.data_ptr<scalar_t>()), mask_p,
                                                   dones_p, B, T, gamma, returns.data_ptr<acc>(), stream));
  });
  return returns;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("gae", &rlk::gae_cuda);
  m.impl("discounted_returns", &rlk::discounted_returns_cuda);
}
