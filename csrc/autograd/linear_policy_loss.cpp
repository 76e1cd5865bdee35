// Autograd of rlkernels::linear_policy_loss (rlkernels.linear_ppo_loss; body:
// csrc/lm_head/linear_policy_loss.cpp).  The forward sweep computes the gradients of
// hidden, weight and bias for d loss = 1 and returns them; backward only scales them by
// the incoming gradient.  With grad_loss == 1 (the usual loss.backward()) on the CPU they
// are handed over as they are (no second weight-sized buffer, nothing mutated); elsewhere
// (CUDA, where reading grad_loss would be a host sync; traced or wrapped tensors; any
// other value) they are scaled out of place.  Differentiating that gradient again raises,
// naming the public op.  The op has no Triton twin: backend "triton" runs the Triton
// kernels inside the same body.
#include "common.h"

namespace rlk::autograd {
namespace {

using Opt = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardSig = Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, c10::ArrayRef<double>,
                           c10::string_view, c10::string_view, double, double, int64_t, int64_t, c10::string_view,
                           const c10::List<bool>&, c10::string_view);
constexpr size_t kNumInputs = 19;

Outputs forward_op(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const Opt& bias,
                   const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& valid,
                   const Opt& weights, const Opt& ref_logprobs, c10::ArrayRef<double> coefficients,
                   c10::string_view kl, c10::string_view agg, double entropy_coef, double temperature,
                   int64_t ignore_index, int64_t chunk, c10::string_view backend, const c10::List<bool>& needs,
                   c10::string_view pieces) {
  static const auto handle = op<ForwardSig>("rlkernels::linear_policy_loss");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs,
                     coefficients, kl, agg, entropy_coef, temperature, ignore_index, chunk, backend, needs, pieces);
}

// grad_loss == 1 is read only where that costs nothing (host_readable, csrc/dispatcher.h).
at::Tensor scaled(const at::Tensor& saved, const at::Tensor& grad_loss) {
  if (host_readable(grad_loss) && host_readable(saved) && grad_loss.numel() == 1 && grad_loss.item<double>() == 1.0) {
    return saved;
  }
  return saved * grad_loss.to(saved.scalar_type());
}

struct LinearPolicyLoss : public torch::autograd::Function<LinearPolicyLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& labels, const Opt& bias, const at::Tensor& old_logprobs,
                               const at::Tensor& advantages, const at::Tensor& valid, const Opt& weights,
                               const Opt& ref_logprobs, c10::ArrayRef<double> coefficients, c10::string_view kl,
                               c10::string_view agg, double entropy_coef, double temperature, int64_t ignore_index,
                               int64_t chunk, c10::string_view backend, const c10::List<bool>& needs,
                               c10::string_view pieces) {
    auto [loss, stats, grad_hidden, grad_weight, grad_bias] =
        forward_op(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs,
                   coefficients, kl, agg, entropy_coef, temperature, ignore_index, chunk, backend, needs, pieces);
    // the inputs only anchor the double-backward error (references, no copies)
    ctx->save_for_backward({grad_hidden, grad_weight, grad_bias, hidden, weight, bias.value_or(at::Tensor())});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({stats, grad_hidden, grad_weight, grad_bias});
    // The stored gradients get no incoming gradient: no weight-sized zeros for them.
    ctx->set_materialize_grads(false);
    return {loss, stats, grad_hidden, grad_weight, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(kNumInputs);
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    // (an empty batch's hidden gradient is empty but still wanted: ask needs_input_grad;
    // the edges are the tensor inputs present: hidden 0, weight 1, labels 2, bias 3)
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    variable_list result(3);
    if (ctx->needs_input_grad(0)) result[0] = scaled(saved[0], grad_loss);
    if (ctx->needs_input_grad(1)) result[1] = scaled(saved[1], grad_loss);
    if (has_bias && ctx->needs_input_grad(3)) result[2] = scaled(saved[2], grad_loss);
    result = first_order_only("linear_ppo_loss", std::move(result), {saved[3], saved[4], saved[5]});
    out[0] = result[0];
    out[1] = result[1];
    out[3] = result[2];
    return out;
  }
};

Outputs linear_policy_loss_autograd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                    const Opt& bias, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                                    const at::Tensor& valid, const Opt& weights, const Opt& ref_logprobs,
                                    c10::ArrayRef<double> coefficients, c10::string_view kl, c10::string_view agg,
                                    double entropy_coef, double temperature, int64_t ignore_index, int64_t chunk,
                                    c10::string_view backend, const c10::List<bool>& needs, c10::string_view pieces) {
  if (!wants_grad({&hidden, &weight, &labels, maybe(bias), &old_logprobs, &advantages, &valid, maybe(weights),
                   maybe(ref_logprobs)})) {
    return forward_op(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs,
                      coefficients, kl, agg, entropy_coef, temperature, ignore_index, chunk, backend, needs, pieces);
  }
  auto out = LinearPolicyLoss::apply(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights,
                                     ref_logprobs, coefficients, kl, agg, entropy_coef, temperature, ignore_index,
                                     chunk, backend, needs, pieces);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) {
  m.impl("linear_policy_loss", &rlk::autograd::linear_policy_loss_autograd);
}
