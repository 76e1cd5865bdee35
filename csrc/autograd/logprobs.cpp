// Autograd of rlkernels::logprobs (Python twin: rlkernels/ops/logprobs.py, _backward).
// Backward: the fused logprobs_backward kernel, or logprobs_backward_inplace into the
// logits buffer with inplace_backward; recorded (double) backward through the reference.
#include <ATen/MemoryOverlap.h>

#include "common.h"

namespace rlk::autograd {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ForwardSig = Outputs(const at::Tensor&, const at::Tensor&, double, int64_t, bool, bool);
using BackwardSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t);
using InplaceSig = void(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, double, int64_t, int64_t);

Outputs forward_op(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index,
                   bool with_entropy, bool inplace_backward) {
  static const auto handle = op<ForwardSig>("rlkernels::logprobs");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(logits, labels, temperature, ignore_index, with_entropy, inplace_backward);
}

// Where the logits' buffer cannot hold the gradient, the in-place backward falls back to a
// fresh gradient: elements sharing memory (expanded, stride 0) cannot each hold their own
// ("too hard to tell" included), and a negated or conjugate view's bytes are not its values
// (torch's fallback for such views cannot write through them either).  Symbolic strides
// (torch.compile, dynamic shapes) count as distinct, as the Python twin does.
bool no_room_in_place(const at::Tensor& t) {
  if (t.is_neg() || t.is_conj()) return true;
  if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return false;
  return at::has_internal_overlap(t) != at::MemOverlap::No;
}

struct Logprobs : public torch::autograd::Function<Logprobs> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& labels,
                               double temperature, int64_t ignore_index, bool with_entropy, bool inplace_backward) {
    auto [values, entropies, saved] = forward_op(logits, labels, temperature, ignore_index, with_entropy,
                                                 inplace_backward);
    ctx->save_for_backward({logits, labels, saved, entropies});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["inplace_backward"] = inplace_backward;
    return {values, entropies, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    if (!ctx->needs_input_grad(0)) return out;
    const variable_list saved_tensors = ctx->get_saved_variables();
    const at::Tensor& logits = saved_tensors[0];
    const at::Tensor& labels = saved_tensors[1];
    const at::Tensor& saved = saved_tensors[2];
    const at::Tensor& entropies = saved_tensors[3];
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const bool with_entropy = entropies.sym_sizes().equals(labels.sym_sizes());
    if (recording()) {
      out[0] = python_backward("logprobs", grads[0], with_entropy ? grads[1] : at::Tensor(), logits, labels,
                               temperature, ignore_index, with_entropy)[0];
      return out;
    }
    // Grads are materialised (zeros for an unused output), as in the Python twin.
    const at::Tensor grad_logprobs = grads[0].to(at::kFloat).contiguous();
    std::optional<at::Tensor> grad_entropy;
    if (with_entropy && grads[1].defined()) grad_entropy = grads[1].to(at::kFloat).contiguous();
    at::AutoDispatchBelowADInplaceOrView below;
    if (ctx->saved_data["inplace_backward"].toBool() && !no_room_in_place(logits)) {
      static const auto inplace = op<InplaceSig>("rlkernels::logprobs_backward_inplace");
      inplace.call(grad_logprobs, grad_entropy, logits, labels, saved, entropies, temperature, ignore_index, 0);
      // The logits now hold the gradient: a new version makes autograd raise where anything
      // (another op's backward, a second backward through this one) still needs the old values.
      torch::autograd::impl::bump_version(logits);
      out[0] = logits.detach();
    } else {
      static const auto fresh = op<BackwardSig>("rlkernels::logprobs_backward");
      out[0] = fresh.call(grad_logprobs, grad_entropy, logits, labels, saved, entropies, temperature, ignore_index,
                          0);
    }
    return out;
  }
};

Outputs logprobs_autograd(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                          int64_t ignore_index, bool with_entropy, bool inplace_backward) {
  if (!wants_grad({&logits, &labels})) {
    return forward_op(logits, labels, temperature, ignore_index, with_entropy, inplace_backward);
  }
  auto out = Logprobs::apply(logits, labels, temperature, ignore_index, with_entropy, inplace_backward);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) { m.impl("logprobs", &rlk::autograd::logprobs_autograd); }
