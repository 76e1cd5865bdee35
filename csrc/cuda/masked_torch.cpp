#include "../args/masked.h"
#include "torch_launch.h"

namespace rlk {
namespace {

at::Tensor masked_row_mean_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  const MaskedParams p = masked_row_mean_args(x, mask, out);
  C10_CUDA_CHECK(cuda::launch_masked_row_mean(p, current_stream()));
  return out;
}

at::Tensor masked_whiten_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask, bool shift_mean,
                              double eps) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  const MaskedParams p = masked_whiten_args(x, mask, shift_mean, eps, out);
  C10_CUDA_CHECK(cuda::launch_masked_whiten(p, current_stream()));
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("masked_row_mean", &rlk::masked_row_mean_cuda);
  m.impl("masked_whiten", &rlk::masked_whiten_cuda);
}
