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

std::tuple<at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& scores,
                                                         const c10::optional<at::Tensor>& group_index,
                                                         int64_t group_size, int64_t num_groups,
                                                         int64_t baseline, int64_t scale, double eps) {
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(), "scores must be a contiguous 1-D tensor");
  const int64_t N = scores.size(0);
  TORCH_CHECK(num_groups >= 0, "num_groups must be >= 0");
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
  c10::cuda::CUDAGuard guard(scores.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto out_dtype = out_dtype_for(scores.scalar_type());
  auto advantages = at::empty({N}, scores.options().dtype(out_dtype));
  auto all_equal = at::empty({num_groups}, scores.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "group_advantages_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_group_advantages(
        cuda::dptr(scores.data_ptr<scalar_t>()),
        group_index.has_value() ? group_index->data_ptr<int64_t>() : nullptr, N, group_size, num_groups,
        int(baseline), int(scale), eps, advantages.data_ptr<acc>(), all_equal.data_ptr<bool>(), stream));
  });
  return {advantages, all_equal};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("group_advantages", &rlk::group_advantages_cuda); }
