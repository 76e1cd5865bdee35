// group_advantages: checks, outputs and the GroupAdvantagesParams both
// backends read (the Python layer validates first, naming the argument).
#pragma once
#include "../core/group_advantages.h"
#include "../torch_common.h"

namespace rlk {

inline GroupAdvantagesParams group_advantages_args(const at::Tensor& scores,
                                                   const c10::optional<at::Tensor>& group_index, int64_t group_size,
                                                   int64_t num_groups, int64_t baseline, int64_t scale, double eps,
                                                   at::Tensor& advantages, at::Tensor& all_equal) {
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
  GroupAdvantagesParams p;
  p.N = N;
  p.group_size = group_size;
  p.num_groups = num_groups;
  p.dtype = dtype_of(scores.scalar_type(), "group_advantages");
  p.scores = scores.data_ptr();
  p.group_index = group_index.has_value() ? group_index->data_ptr<int64_t>() : nullptr;
  p.baseline = int(baseline);
  p.scale = int(scale);
  p.eps = eps;
  advantages = empty_acc({N}, scores);
  all_equal = at::empty({num_groups}, scores.options().dtype(at::kBool));
  p.advantages = advantages.data_ptr();
  p.all_equal = all_equal.data_ptr<bool>();
  return p;
}

}  // namespace rlk
