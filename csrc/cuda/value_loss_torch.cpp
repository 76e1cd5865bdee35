#include "../args/value_loss.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_cuda(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const c10::optional<at::Tensor>& mask, c10::ArrayRef<double> coefficients, c10::string_view agg,
    bool need_grad) {
  c10::cuda::CUDAGuard guard(values.device());
  TokenLossOutputs out;
  ValueLossParams p = value_loss_args(values, old_values, returns, mask, coefficients, agg, need_grad, out);
  const at::Tensor workspace = at::empty({cuda::token_loss_workspace(p.rows.B, p.rows.T, kValueSlots)},
                                         values.options().dtype(at::kDouble));
  p.rows.workspace = workspace.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_value_loss(p, current_stream()));
  return out.tuple();
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("value_loss", &rlk::value_loss_cuda); }
