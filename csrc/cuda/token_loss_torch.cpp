#include "../args/token_loss.h"
#include "torch_launch.h"

namespace rlk {
namespace {

at::Tensor scale_rows_cuda(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& grad_loss,
                           at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out, grad_loss_value;
  const ScaleRowsParams p = scale_rows_args(grad, row_scale, grad_loss, dtype, out, grad_loss_value);
  C10_CUDA_CHECK(cuda::launch_scale_rows(p, current_stream()));
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("scale_rows", &rlk::scale_rows_cuda); }
