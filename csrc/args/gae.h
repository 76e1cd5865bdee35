// gae and discounted_returns: the checks that keep direct torch.ops calls
// memory-safe (the Python layer validates first, naming the argument), the
// outputs, and the one GaeParams both backends read.
#pragma once
#include "../core/gae.h"
#include "../torch_common.h"

namespace rlk {

// [B, T] rewards (and values, of their dtype), optional [B, T] bool mask and dones.
inline GaeParams rollout_params(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& dones,
                                const char* op) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [B, T], got ", rewards.sizes());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_rows(rewards, "rewards", B, T);
  if (values.has_value()) {
    check_rows(*values, "values", B, T);
    TORCH_CHECK(values->scalar_type() == rewards.scalar_type(), "values must have the dtype of rewards");
    check_same_device(rewards, values, "values");
  }
  check_same_device(rewards, mask, "mask");
  check_same_device(rewards, dones, "dones");
  GaeParams p;
  p.B = B;
  p.T = T;
  p.mask = optional_bool_ptr(mask, "mask", B, T);
  p.dones = optional_bool_ptr(dones, "dones", B, T);
  p.dtype = dtype_of(rewards.scalar_type(), op);
  p.rewards = rewards.data_ptr();
  p.values = optional_data(values);
  return p;
}

inline GaeParams gae_args(const at::Tensor& rewards, const at::Tensor& values, const c10::optional<at::Tensor>& mask,
                          const c10::optional<at::Tensor>& dones, const c10::optional<at::Tensor>& last_values,
                          double gamma, double lam, at::Tensor& advantages, at::Tensor& returns) {
  GaeParams p = rollout_params(rewards, values, mask, dones, "gae");
  if (last_values.has_value()) {
    check_same_device(rewards, last_values, "last_values");
    TORCH_CHECK(last_values->dim() == 1 && last_values->size(0) == p.B && last_values->is_contiguous(),
                "last_values must be a contiguous [B] tensor");
    TORCH_CHECK(last_values->scalar_type() == out_dtype_for(rewards.scalar_type()), "last_values must be ",
                out_dtype_for(rewards.scalar_type()));
  }
  advantages = empty_acc({p.B, p.T}, rewards);
  returns = empty_acc({p.B, p.T}, rewards);
  p.last_values = optional_data(last_values);
  p.gamma = gamma;
  p.lam = lam;
  p.advantages = advantages.data_ptr();
  p.returns = returns.data_ptr();
  return p;
}

inline GaeParams discounted_returns_args(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                         const c10::optional<at::Tensor>& dones, double gamma, at::Tensor& returns) {
  GaeParams p = rollout_params(rewards, c10::nullopt, mask, dones, "discounted_returns");
  returns = empty_acc({p.B, p.T}, rewards);
  p.gamma = gamma;
  p.returns = returns.data_ptr();
  return p;
}

}  // namespace rlk
