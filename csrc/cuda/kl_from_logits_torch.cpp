#include "../args/kl_from_logits.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_from_logits_cuda(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                       const c10::optional<at::Tensor>& mask, double temperature) {
  c10::cuda::CUDAGuard guard(logits.device());
  KlFromLogitsTensors t;
  KlFromLogitsParams p = kl_from_logits_args(logits, ref_logits, mask, temperature, t);
  p.splits = forward_splits(p.N, p.V);
  const at::Tensor workspace =
      at::empty({p.splits > 1 ? 5 * p.N * p.splits : 0}, logits.options().dtype(at::kFloat));
  p.workspace = p.splits > 1 ? workspace.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(cuda::launch_kl_from_logits(p, current_stream()));
  return {t.first, t.second};
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& logits,
                                                                const at::Tensor& ref_logits,
                                                                const c10::optional<at::Tensor>& mask,
                                                                const at::Tensor& saved, double temperature,
                                                                bool logits_grad, bool ref_grad) {
  c10::cuda::CUDAGuard guard(logits.device());
  KlFromLogitsTensors t;
  const KlFromLogitsParams p =
      kl_from_logits_backward_args(grad_kl, logits, ref_logits, mask, saved, temperature, logits_grad, ref_grad, t);
  C10_CUDA_CHECK(cuda::launch_kl_from_logits_backward(p, current_stream()));
  return {t.first, t.second};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("kl_from_logits", &rlk::kl_from_logits_cuda);
  m.impl("kl_from_logits_backward", &rlk::kl_from_logits_backward_cuda);
}
