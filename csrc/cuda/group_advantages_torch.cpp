#include "../args/group_advantages.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& scores,
                                                         const c10::optional<at::Tensor>& group_index,
                                                         int64_t group_size, int64_t num_groups,
                                                         int64_t baseline, int64_t scale, double eps) {
  c10::cuda::CUDAGuard guard(scores.device());
  // Group ids are not range-checked here (a device read would synchronise); the
  // kernel only compares them with its own group's id.
  at::Tensor advantages, all_equal;
  const GroupAdvantagesParams p = group_advantages_args(scores, group_index, group_size, num_groups, baseline, scale,
                                                        eps, advantages, all_equal);
  C10_CUDA_CHECK(cuda::launch_group_advantages(p, current_stream()));
  return {advantages, all_equal};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("group_advantages", &rlk::group_advantages_cuda); }
