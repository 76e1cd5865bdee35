#include "../args/kl_penalty.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_penalty_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                   c10::string_view kind, double clamp) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  KlPenaltyTensors t;
  const KlPenaltyParams p = kl_penalty_args(logprobs, ref_logprobs, kind, clamp, t);
  C10_CUDA_CHECK(cuda::launch_kl_penalty(p, current_stream()));
  return {t.value, t.slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("kl_penalty", &rlk::kl_penalty_cuda); }
