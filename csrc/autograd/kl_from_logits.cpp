// Autograd of rlkernels::kl_from_logits (Python twin: rlkernels/ops/kl_from_logits.py,
// _backward): the fused kl_from_logits_backward kernel for the inputs that need a
// gradient; recorded (double) backward through the reference.
#include "common.h"

namespace rlk::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor>;
using ForwardSig = Outputs(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double);
using BackwardSig = Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, double, bool, bool);

Outputs forward_op(const at::Tensor& logits, const at::Tensor& ref_logits, const std::optional<at::Tensor>& mask,
                   double temperature) {
  static const auto handle = op<ForwardSig>("rlkernels::kl_from_logits");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(logits, ref_logits, mask, temperature);
}

struct KlFromLogits : public torch::autograd::Function<KlFromLogits> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& ref_logits,
                               const std::optional<at::Tensor>& mask, double temperature) {
    auto [kl, saved] = forward_op(logits, ref_logits, mask, temperature);
    ctx->save_for_backward({logits, ref_logits, mask.value_or(at::Tensor()), saved});
    ctx->saved_data["temperature"] = temperature;
    return {kl, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    const bool logits_grad = ctx->needs_input_grad(0), ref_grad = ctx->needs_input_grad(1);
    if (!logits_grad && !ref_grad) return out;
    const variable_list saved_tensors = ctx->get_saved_variables();
    const at::Tensor& logits = saved_tensors[0];
    const at::Tensor& ref_logits = saved_tensors[1];
    std::optional<at::Tensor> mask;
    if (saved_tensors[2].defined()) mask = saved_tensors[2];
    const double temperature = ctx->saved_data["temperature"].toDouble();
    if (recording()) {
      variable_list g = python_backward("kl_from_logits", grads[0], logits, ref_logits, saved_tensors[2],
                                        temperature, logits_grad, ref_grad);
      out[0] = g[0];
      out[1] = g[1];
      return out;
    }
    static const auto backward_op = op<BackwardSig>("rlkernels::kl_from_logits_backward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [grad_logits, grad_ref] = backward_op.call(grads[0].to(at::kFloat).contiguous(), logits, ref_logits, mask,
                                                    saved_tensors[3], temperature, logits_grad, ref_grad);
    if (logits_grad) out[0] = grad_logits;
    if (ref_grad) out[1] = grad_ref;
    return out;
  }
};

Outputs kl_from_logits_autograd(const at::Tensor& logits, const at::Tensor& ref_logits,
                                const std::optional<at::Tensor>& mask, double temperature) {
  if (!wants_grad({&logits, &ref_logits, maybe(mask)})) return forward_op(logits, ref_logits, mask, temperature);
  auto out = KlFromLogits::apply(logits, ref_logits, mask, temperature);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) { m.impl("kl_from_logits", &rlk::autograd::kl_from_logits_autograd); }
