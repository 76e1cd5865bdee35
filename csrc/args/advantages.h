// Argument checks for the advantage ops, shared by the CPU and CUDA
// implementations (the Python layer has already validated with messages that
// name the arguments; these guard direct torch.ops calls).
#pragma once
#include "../torch_common.h"

namespace rlk {

struct RolloutArgs {
  int64_t B, T;
  const uint8_t* mask;
  const uint8_t* dones;
  at::ScalarType out_dtype;
};

inline RolloutArgs check_rollout(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                                 const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& dones) {
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
  return {B, T, optional_bool_ptr(mask, "mask", B, T), optional_bool_ptr(dones, "dones", B, T),
          out_dtype_for(rewards.scalar_type())};
}

inline void check_last_values(const RolloutArgs& a, const at::Tensor& rewards,
                              const c10::optional<at::Tensor>& last_values) {
  if (!last_values.has_value()) return;
  check_same_device(rewards, last_values, "last_values");
  TORCH_CHECK(last_values->dim() == 1 && last_values->size(0) == a.B && last_values->is_contiguous(),
              "last_values must be a contiguous [B] tensor");
  TORCH_CHECK(last_values->scalar_type() == a.out_dtype, "last_values must be ", a.out_dtype);
}

inline void check_group_args(const at::Tensor& scores, const c10::optional<at::Tensor>& group_index,
                             int64_t group_size, int64_t num_groups, int64_t baseline, int64_t scale) {
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(), "scores must be a contiguous 1-D tensor");
  const int64_t N = scores.size(0);
  // Every group but an empty batch's holds a score, so at most N groups; this bounds
  // the per-group statistics the kernels allocate.
  TORCH_CHECK(num_groups >= 0 && num_groups <= N, "group_advantages: num_groups must lie in [0, ", N,
              "] (the number of scores), got ", num_groups);
  check_same_device(scores, group_index, "group_index");
  if (group_index.has_value()) {
    TORCH_CHECK(group_index->dim() == 1 && group_index->size(0) == N && group_index->is_contiguous() &&
                    group_index->scalar_type() == at::kLong,
                "group_index must be a contiguous int64 tensor of shape [N]");
  } else {
    TORCH_CHECK(group_size > 0 && N % group_size == 0 && N / group_size == num_groups,
                "group_size must divide N into num_groups groups");
  }
  TORCH_CHECK(baseline == 0 || baseline == 1, "bad baseline code");
  TORCH_CHECK(scale >= 0 && scale <= 2, "bad scale code");
}

inline const uint8_t* check_row_mean_args(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 2, "x must be [R, C], got ", x.sizes());
  check_rows(x, "x", x.size(0), x.size(1));
  check_same_device(x, mask, "mask");
  return optional_bool_ptr(mask, "mask", x.size(0), x.size(1));
}

inline const uint8_t* check_whiten_args(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  check_same_device(x, mask, "mask");
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == x.numel(),
              "mask must be a contiguous bool tensor of x's size");
  return reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
}

}  // namespace rlk
