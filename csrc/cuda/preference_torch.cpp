#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../core/common.h"
#include "../core/preference.h"
#include "../args/losses.h"
#include "../torch_common.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_cuda(
    const at::Tensor& policy_chosen, const at::Tensor& policy_rejected, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, double beta, c10::string_view kind, double label_smoothing) {
  const PreferenceKind k = check_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kind);
  const int64_t B = policy_chosen.size(0);
  c10::cuda::CUDAGuard guard(policy_chosen.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto opts = policy_chosen.options().dtype(out_dtype_for(policy_chosen.scalar_type()));
  auto losses = at::empty({B}, opts), chosen = at::empty({B}, opts), rejected = at::empty({B}, opts);
  auto dlogits = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, policy_chosen.scalar_type(), "dpo_loss_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_dpo_loss(
        cuda::dptr(policy_chosen.data_ptr<scalar_t>()), cuda::dptr(policy_rejected.data_ptr<scalar_t>()),
        cuda::dptr(ref_chosen.data_ptr<scalar_t>()), cuda::dptr(ref_rejected.data_ptr<scalar_t>()), B, int(k), beta,
        label_smoothing, losses.data_ptr<acc>(), chosen.data_ptr<acc>(), rejected.data_ptr<acc>(),
        dlogits.data_ptr<acc>(), stream));
  });
  return {losses, chosen, rejected, dlogits};
}

std::tuple<at::Tensor, at::Tensor> sequence_logprobs_cuda(const at::Tensor& token_logprobs,
                                                          const c10::optional<at::Tensor>& mask, bool average) {
  const uint8_t* mask_p = check_sequence_logprobs(token_logprobs, mask);
  const int64_t B = token_logprobs.size(0), T = token_logprobs.size(1);
  c10::cuda::CUDAGuard guard(token_logprobs.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto opts = token_logprobs.options().dtype(out_dtype_for(token_logprobs.scalar_type()));
  auto out = at::empty({B}, opts), counts = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, token_logprobs.scalar_type(), "sequence_logprobs_cuda",
                                  [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_sequence_logprobs(cuda::dptr(token_logprobs.data_ptr<scalar_t>()), mask_p, B, T,
                                                  average, out.data_ptr<acc>(), counts.data_ptr<acc>(), stream));
  });
  return {out, counts};
}

at::Tensor sequence_logprobs_backward_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& mask,
                                          const at::Tensor& num_tokens, bool average, int64_t T,
                                          at::ScalarType dtype) {
  const uint8_t* mask_p = check_sequence_logprobs_backward(grad, mask, num_tokens, T, dtype);
  const int64_t B = grad.size(0);
  c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  auto out = at::empty({B, T}, grad.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sequence_logprobs_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using out_t = typename cuda::device_type<scalar_t>::type;
    C10_CUDA_CHECK(cuda::launch_sequence_logprobs_backward(
        grad.data_ptr<acc>(), mask_p, num_tokens.data_ptr<acc>(), average, B, T,
        reinterpret_cast<out_t*>(out.data_ptr<scalar_t>()), stream));
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("sequence_logprobs_backward", &rlk::sequence_logprobs_backward_cuda);
  m.impl("dpo_loss", &rlk::dpo_loss_cuda);
  m.impl("sequence_logprobs", &rlk::sequence_logprobs_cuda);
}
