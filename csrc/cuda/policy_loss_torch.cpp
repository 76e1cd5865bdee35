#include "../args/policy_loss.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& ref_logprobs, c10::ArrayRef<double> coefficients, c10::string_view kl,
    c10::string_view agg, bool need_grad) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  TokenLossOutputs out;
  PolicyLossParams p = policy_loss_args(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients,
                                        kl, agg, need_grad, out);
  const at::Tensor workspace = at::empty({cuda::token_loss_workspace(p.rows.B, p.rows.T, kPolicySlots)},
                                         logprobs.options().dtype(at::kDouble));
  p.rows.workspace = workspace.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_policy_loss(p, current_stream()));
  return out.tuple();
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("policy_loss", &rlk::policy_loss_cuda); }
