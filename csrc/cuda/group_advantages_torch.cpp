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

std::tuple<at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& scores,
                                                         const c10::optional<at::Tensor>& group_index,
                                                         int64_t group_size, int64_t num_groups,
                                                         int64_t baseline, int64_t scale, double eps) {
  check_group_args(scores, group_index, group_size, num_groups, baseline, scale);
  const int64_t N = scores.size(0);
  const int64_t* index = group_index.has_value() ? group_index->data_ptr<int64_t>() : nullptr;
  c10::cuda::CUDAGuard guard(scores.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto out_dtype = out_dtype_for(scores.scalar_type());
  auto advantages = at::empty({N}, scores.options().dtype(out_dtype));
  auto all_equal = at::empty({num_groups}, scores.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "group_advantages_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_group_advantages(
        cuda::dptr(scores.data_ptr<scalar_t>()),
        index, N, group_size, num_groups,
        int(baseline), int(scale), eps, advantages.data_ptr<acc>(), all_equal.data_ptr<bool>(), stream));
  });
  return {advantages, all_equal};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("group_advantages", &rlk::group_advantages_cuda); }
