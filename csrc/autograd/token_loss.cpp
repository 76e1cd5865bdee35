// Autograd of the token-level losses rlkernels::policy_loss and rlkernels::value_loss
// (Python twin: rlkernels/ops/_token_loss.py, register).  Their forward returns the
// per-token gradient before aggregation and each row's share of it, so backward is
// d loss / d input_0 = grad_loss * row_scale[b] * grad[b, t] by the scale_rows kernel
// (small problems stay on one thread; a broadcast multiply would wake a thread pool).
// Differentiating that gradient again raises, naming the public op.
#include "common.h"

namespace rlk::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Opt = std::optional<at::Tensor>;
using PolicySig = Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const Opt&,
                          c10::ArrayRef<double>, c10::string_view, c10::string_view, bool);
using ValueSig = Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, c10::ArrayRef<double>,
                         c10::string_view, bool);
using ScaleRowsSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType);

// What the forward of both losses keeps: grad and row_scale (outputs, non-differentiable)
// and the primary input, a reference that only anchors the double-backward error.
void save(AutogradContext* ctx, const at::Tensor& primary, const Outputs& out) {
  ctx->save_for_backward({std::get<2>(out), std::get<3>(out), primary});
  ctx->saved_data["dtype"] = static_cast<int64_t>(primary.scalar_type());
  ctx->mark_non_differentiable({std::get<1>(out), std::get<2>(out), std::get<3>(out)});
  // The other outputs get no gradient: do not materialise zeros of their size.
  ctx->set_materialize_grads(false);
}

variable_list scale_rows(AutogradContext* ctx, const at::Tensor& grad_loss, size_t num_inputs,
                         const char* public_name) {
  variable_list out(num_inputs);
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor& grad = saved[0];
  if (!grad_loss.defined() || grad.dim() != 2) return out;  // no gradient needed
  static const auto handle = op<ScaleRowsSig>("rlkernels::scale_rows");
  at::Tensor grad_input;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    grad_input = handle.call(grad, saved[1], grad_loss,
                             static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt()));
  }
  out[0] = first_order_only(public_name, {grad_input}, {saved[2]})[0];
  return out;
}

Outputs policy_op(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                  const Opt& mask, const Opt& weights, const Opt& ref_logprobs, c10::ArrayRef<double> coefficients,
                  c10::string_view kl, c10::string_view agg, bool need_grad) {
  static const auto handle = op<PolicySig>("rlkernels::policy_loss");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients, kl, agg,
                     need_grad);
}

struct PolicyLoss : public torch::autograd::Function<PolicyLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const Opt& mask, const Opt& weights,
                               const Opt& ref_logprobs, c10::ArrayRef<double> coefficients, c10::string_view kl,
                               c10::string_view agg, bool need_grad) {
    Outputs out = policy_op(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients, kl, agg,
                            need_grad);
    save(ctx, logprobs, out);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return scale_rows(ctx, grads[0], 10, "ppo_loss/grpo_loss");
  }
};

Outputs policy_loss_autograd(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                             const Opt& mask, const Opt& weights, const Opt& ref_logprobs,
                             c10::ArrayRef<double> coefficients, c10::string_view kl, c10::string_view agg,
                             bool need_grad) {
  if (!wants_grad({&logprobs, &old_logprobs, &advantages, maybe(mask), maybe(weights), maybe(ref_logprobs)})) {
    return policy_op(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients, kl, agg,
                     need_grad);
  }
  auto out = PolicyLoss::apply(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients, kl, agg,
                               need_grad);
  return {out[0], out[1], out[2], out[3]};
}

Outputs value_op(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const Opt& mask,
                 c10::ArrayRef<double> coefficients, c10::string_view agg, bool need_grad) {
  static const auto handle = op<ValueSig>("rlkernels::value_loss");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(values, old_values, returns, mask, coefficients, agg, need_grad);
}

struct ValueLoss : public torch::autograd::Function<ValueLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& old_values,
                               const at::Tensor& returns, const Opt& mask, c10::ArrayRef<double> coefficients,
                               c10::string_view agg, bool need_grad) {
    Outputs out = value_op(values, old_values, returns, mask, coefficients, agg, need_grad);
    save(ctx, values, out);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return scale_rows(ctx, grads[0], 7, "value_loss");
  }
};

Outputs value_loss_autograd(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                            const Opt& mask, c10::ArrayRef<double> coefficients, c10::string_view agg,
                            bool need_grad) {
  if (!wants_grad({&values, &old_values, &returns, maybe(mask)})) {
    return value_op(values, old_values, returns, mask, coefficients, agg, need_grad);
  }
  auto out = ValueLoss::apply(values, old_values, returns, mask, coefficients, agg, need_grad);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) {
  m.impl("policy_loss", &rlk::autograd::policy_loss_autograd);
  m.impl("value_loss", &rlk::autograd::value_loss_autograd);
}
