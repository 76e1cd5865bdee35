#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "../core/common.h"
#include "../core/loss_agg.h"
#include "../core/policy_loss.h"
#include "../core/value_loss.h"
#include "../args/losses.h"
#include "../torch_common.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

template <typename T>
const typename cuda::device_type<T>::type* optional_dptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? cuda::dptr(t->data_ptr<T>()) : nullptr;
}

at::Tensor workspace_for(const at::Tensor& like, int64_t B, int64_t T, int slots) {
  return at::empty({cuda::token_loss_workspace(B, T, slots)}, like.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& ref_logprobs, c10::ArrayRef<double> coefficients, c10::string_view kl,
    c10::string_view agg, bool need_grad) {
  const PolicyCoefficients c = policy_coefficients(coefficients);
  const PolicyArgs args = check_policy_loss(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, kl, agg);
  const int64_t B = args.rows.B, T = args.rows.T;
  const bool adv_per_row = args.advantages_per_row;
  const KLKind kind = args.kl;
  const uint8_t* mask_p = args.rows.mask;
  const Agg mode = args.rows.agg;
  c10::cuda::CUDAGuard guard(logprobs.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  TokenLossOutputs out = token_loss_outputs(logprobs, kPolicyStats, need_grad);
  at::Tensor workspace = workspace_for(logprobs, B, T, kPolicySlots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "policy_loss_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_policy_loss(
        cuda::dptr(logprobs.data_ptr<scalar_t>()), cuda::dptr(old_logprobs.data_ptr<scalar_t>()),
        cuda::dptr(advantages.data_ptr<scalar_t>()), adv_per_row, optional_dptr<scalar_t>(weights),
        optional_dptr<scalar_t>(ref_logprobs), mask_p, B, T, c.clip_low, c.clip_high, c.dual_clip,
        c.log_ratio_clamp, c.kl_coef, int(kind), int(mode), c.num_tokens, c.num_seqs, c.norm_length,
        need_grad ? out.grad.data_ptr<acc>() : nullptr,
        out.row_scale.data_ptr<acc>(), out.loss.data_ptr<acc>(), out.stats.data_ptr<acc>(),
        workspace.data_ptr<double>(), stream));
  });
  return {out.loss, out.stats, out.grad, out.row_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_cuda(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const c10::optional<at::Tensor>& mask, c10::ArrayRef<double> coefficients, c10::string_view agg,
    bool need_grad) {
  const ValueCoefficients c = value_coefficients(coefficients);
  const TokenLossArgs args = check_value_loss(values, old_values, returns, mask, agg);
  const int64_t B = args.B, T = args.T;
  const uint8_t* mask_p = args.mask;
  const Agg mode = args.agg;
  c10::cuda::CUDAGuard guard(values.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  TokenLossOutputs out = token_loss_outputs(values, kValueStats, need_grad);
  at::Tensor workspace = workspace_for(values, B, T, kValueSlots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "value_loss_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_value_loss(
        cuda::dptr(values.data_ptr<scalar_t>()), cuda::dptr(old_values.data_ptr<scalar_t>()),
        cuda::dptr(returns.data_ptr<scalar_t>()), mask_p, B, T, std::isfinite(c.clip), c.clip, int(mode),
        c.num_tokens, c.num_seqs, c.norm_length,
        need_grad ? out.grad.data_ptr<acc>() : nullptr, out.row_scale.data_ptr<acc>(), out.loss.data_ptr<acc>(),
        out.stats.data_ptr<acc>(), workspace.data_ptr<double>(), stream));
  });
  return {out.loss, out.stats, out.grad, out.row_scale};
}

at::Tensor scale_rows_cuda(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& grad_loss,
                           at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = scale_rows_output(grad, row_scale, grad_loss, dtype);
  const int64_t B = grad.size(0), T = grad.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor g = grad_loss.to(grad.scalar_type()).reshape({1}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_rows_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using out_t = typename cuda::device_type<scalar_t>::type;
    C10_CUDA_CHECK(cuda::launch_scale_rows(grad.data_ptr<acc>(), row_scale.data_ptr<acc>(), g.data_ptr<acc>(), B, T,
                                           reinterpret_cast<out_t*>(out.data_ptr<scalar_t>()), stream));
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("policy_loss", &rlk::policy_loss_cuda);
  m.impl("value_loss", &rlk::value_loss_cuda);
  m.impl("scale_rows", &rlk::scale_rows_cuda);
}
