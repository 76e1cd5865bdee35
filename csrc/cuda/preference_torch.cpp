#include "../args/preference.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_cuda(
    const at::Tensor& policy_chosen, const at::Tensor& policy_rejected, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, double beta, c10::string_view kind, double label_smoothing) {
  c10::cuda::CUDAGuard guard(policy_chosen.device());
  PreferenceOutputs out;
  const PreferenceParams p =
      dpo_loss_args(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind, label_smoothing, out);
  C10_CUDA_CHECK(cuda::launch_dpo_loss(p, current_stream()));
  return out.tuple();
}

std::tuple<at::Tensor, at::Tensor> sequence_logprobs_cuda(const at::Tensor& token_logprobs,
                                                          const c10::optional<at::Tensor>& mask, bool average) {
  c10::cuda::CUDAGuard guard(token_logprobs.device());
  at::Tensor sums, counts;
  const SequenceLogprobsParams p = sequence_logprobs_args(token_logprobs, mask, average, sums, counts);
  C10_CUDA_CHECK(cuda::launch_sequence_logprobs(p, current_stream()));
  return {sums, counts};
}

at::Tensor sequence_logprobs_backward_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& mask,
                                          const at::Tensor& num_tokens, bool average, int64_t T,
                                          at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out;
  const SequenceLogprobsParams p = sequence_logprobs_backward_args(grad, mask, num_tokens, average, T, dtype, out);
  C10_CUDA_CHECK(cuda::launch_sequence_logprobs_backward(p, current_stream()));
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("sequence_logprobs_backward", &rlk::sequence_logprobs_backward_cuda);
  m.impl("dpo_loss", &rlk::dpo_loss_cuda);
  m.impl("sequence_logprobs", &rlk::sequence_logprobs_cuda);
}
