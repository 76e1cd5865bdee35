// Autograd of rlkernels::kl_penalty (Python twin: rlkernels/ops/kl_penalty.py, _backward):
// the forward's slope times the incoming gradient (negated for ref_logprobs), in each
// input's dtype; recorded (double) backward through the reference.
#include "common.h"

namespace rlk::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor>;
using ForwardSig = Outputs(const at::Tensor&, const at::Tensor&, c10::string_view, double);

Outputs forward_op(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, c10::string_view kind, double clamp) {
  static const auto handle = op<ForwardSig>("rlkernels::kl_penalty");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(logprobs, ref_logprobs, kind, clamp);
}

struct KlPenalty : public torch::autograd::Function<KlPenalty> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                               c10::string_view kind, double clamp) {
    auto [value, slope] = forward_op(logprobs, ref_logprobs, kind, clamp);
    // The inputs are kept for a double backward only (references, no copies).
    ctx->save_for_backward({slope, logprobs, ref_logprobs});
    ctx->saved_data["kind"] = std::string(kind);
    ctx->saved_data["clamp"] = clamp;
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(logprobs.scalar_type()),
                                                     static_cast<int64_t>(ref_logprobs.scalar_type())};
    return {value, slope};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    const bool need_logprobs = ctx->needs_input_grad(0), need_ref = ctx->needs_input_grad(1);
    if (!need_logprobs && !need_ref) return out;
    const variable_list saved = ctx->get_saved_variables();
    if (recording()) {
      // The saved slope is a constant to autograd; the reference's graph carries the curvature.
      variable_list g = python_backward("kl_penalty", grads[0], saved[1], saved[2],
                                        ctx->saved_data["kind"].toStringRef(), ctx->saved_data["clamp"].toDouble(),
                                        need_logprobs, need_ref);
      out[0] = g[0];
      out[1] = g[1];
      return out;
    }
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const at::Tensor grad = grads[0] * saved[0];
    if (need_logprobs) out[0] = grad.to(static_cast<at::ScalarType>(dtypes[0]));
    if (need_ref) out[1] = grad.neg().to(static_cast<at::ScalarType>(dtypes[1]));
    return out;
  }
};

Outputs kl_penalty_autograd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, c10::string_view kind,
                            double clamp) {
  if (!wants_grad({&logprobs, &ref_logprobs})) return forward_op(logprobs, ref_logprobs, kind, clamp);
  auto out = KlPenalty::apply(logprobs, ref_logprobs, kind, clamp);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) { m.impl("kl_penalty", &rlk::autograd::kl_penalty_autograd); }
