// Torch-facing CUDA ops of logprobs (forward, vocabulary tile, backward).
// Labels are range-checked in Python (a device read here would synchronise);
// the kernels never read outside a row.
#include "../args/logprobs.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                             double temperature, int64_t ignore_index,
                                                             bool with_entropy, bool /*inplace_backward*/) {
  c10::cuda::CUDAGuard guard(logits.device());
  LogprobsOutputs out;
  LogprobsParams p = logprobs_args(logits, labels, temperature, ignore_index, with_entropy, out);
  p.splits = forward_splits(p.N, p.V);
  const at::Tensor workspace =
      at::empty({p.splits > 1 ? 3 * p.N * p.splits : 0}, logits.options().dtype(at::kFloat));
  p.workspace = p.splits > 1 ? workspace.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_logprobs_forward(p, current_stream()));
  return {out.logprobs, out.entropy, out.saved};
}

void logprobs_vocab_tile_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                              double temperature, int64_t ignore_index, int64_t vocab_start, bool with_entropy,
                              bool finish) {
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor x;
  const LogprobsParams p = logprobs_vocab_tile_args(logits, labels, state, temperature, ignore_index, vocab_start,
                                                    with_entropy, finish, x);
  C10_CUDA_CHECK(cuda::launch_logprobs_vocab_tile(p, current_stream()));
}

void logprobs_backward_run(const LogprobsParams& p, const at::Tensor& logits) {
  c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_logprobs_backward(p, current_stream()));
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("logprobs", &rlk::logprobs_cuda);
  m.impl("logprobs_backward", &rlk::logprobs_backward_op<rlk::logprobs_backward_run>);
  m.impl("logprobs_backward_inplace", &rlk::logprobs_backward_inplace_op<rlk::logprobs_backward_run>);
  m.impl("logprobs_vocab_tile", &rlk::logprobs_vocab_tile_cuda);
}
