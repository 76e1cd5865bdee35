#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../core/common.h"
#include "../torch_common.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& dones,
                                            const c10::optional<at::Tensor>& last_values,
                                            double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, T], got ", rewards.sizes());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_rows(rewards, "rewards", B, T);
  check_rows(values, "values", B, T);
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "values must have the dtype of rewards");
  check_same_device(rewards, values, "values");
  check_same_device(rewards, mask, "mask");
  check_same_device(rewards, dones, "dones");
  check_same_device(rewards, last_values, "last_values");
  const uint8_t* mask_p = optional_bool_ptr(mask, "mask", B, T);
  const uint8_t* dones_p = optional_bool_ptr(dones, "dones", B, T);
  const auto out_dtype = out_dtype_for(rewards.scalar_type());
  if (last_values.has_value()) {
    TORCH_CHECK(last_values->dim() == 1 && last_values->size(0) == B && last_values->is_contiguous(),
                "last_values must be a contiguous [B] tensor");
    TORCH_CHECK(last_values->scalar_type() == out_dtype, "last_values must be ", out_dtype);
  }
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
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, T], got ", rewards.sizes());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_rows(rewards, "rewards", B, T);
  check_same_device(rewards, mask, "mask");
  check_same_device(rewards, dones, "dones");
  const uint8_t* mask_p = optional_bool_ptr(mask, "mask", B, T);
  const uint8_t* dones_p = optional_bool_ptr(dones, "dones", B, T);
  c10::cuda::CUDAGuard guard(rewards.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  auto returns = at::empty({B, T}, rewards.options().dtype(out_dtype_for(rewards.scalar_type())));
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
