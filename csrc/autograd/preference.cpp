// Autograd of rlkernels::dpo_loss, rlkernels::sequence_logprobs and
// rlkernels::dpo_sequence_loss (Python twins: rlkernels/ops/preference.py,
// _dpo_backward, _sequence_backward and _dpo_sequence_backward).
#include "common.h"

namespace rlk::autograd {
namespace {

// ---- dpo_loss: the forward saves d loss / d z per pair; z = pc - pr - rc + rr ---------------

using DpoOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using DpoSig = DpoOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                          c10::string_view, double);

DpoOutputs dpo_op(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr, double beta,
                  c10::string_view kind, double label_smoothing) {
  static const auto handle = op<DpoSig>("rlkernels::dpo_loss");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(pc, pr, rc, rr, beta, kind, label_smoothing);
}

struct DpoLoss : public torch::autograd::Function<DpoLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pc, const at::Tensor& pr,
                               const at::Tensor& rc, const at::Tensor& rr, double beta, c10::string_view kind,
                               double label_smoothing) {
    auto [losses, chosen_rewards, rejected_rewards, dlogits] = dpo_op(pc, pr, rc, rr, beta, kind, label_smoothing);
    ctx->save_for_backward({dlogits, pc, pr, rc, rr});  // the inputs for first_order_only (references)
    ctx->mark_non_differentiable({chosen_rewards, rejected_rewards, dlogits});
    ctx->set_materialize_grads(false);
    return {losses, chosen_rewards, rejected_rewards, dlogits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& dlogits = saved[0];
    const at::Tensor g = grads[0].to(dlogits.scalar_type()) * dlogits;  // d loss / d z
    // Only the inputs that need a gradient get one, each a tensor of its own (pc takes g itself).
    const bool positive[4] = {true, false, false, true};
    variable_list input_grads(4);
    for (int i = 0; i < 4; ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      const at::ScalarType dtype = saved[i + 1].scalar_type();
      const at::Tensor signed_g = !positive[i] ? g.neg() : (i == 0 ? g : g.clone());
      input_grads[i] = signed_g.to(dtype);
    }
    input_grads = first_order_only("dpo_loss", std::move(input_grads), {saved.begin() + 1, saved.end()});
    std::copy(input_grads.begin(), input_grads.end(), out.begin());
    return out;
  }
};

DpoOutputs dpo_loss_autograd(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,
                             double beta, c10::string_view kind, double label_smoothing) {
  if (!wants_grad({&pc, &pr, &rc, &rr})) return dpo_op(pc, pr, rc, rr, beta, kind, label_smoothing);
  auto out = DpoLoss::apply(pc, pr, rc, rr, beta, kind, label_smoothing);
  return {out[0], out[1], out[2], out[3]};
}

// ---- sequence_logprobs: the sequence_logprobs_backward kernel ---------------------------------

using SequenceOutputs = std::tuple<at::Tensor, at::Tensor>;
using SequenceSig = SequenceOutputs(const at::Tensor&, const std::optional<at::Tensor>&, bool);
using SequenceBackwardSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, bool,
                                       int64_t, at::ScalarType);

SequenceOutputs sequence_op(const at::Tensor& token_logprobs, const std::optional<at::Tensor>& mask, bool average) {
  static const auto handle = op<SequenceSig>("rlkernels::sequence_logprobs");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(token_logprobs, mask, average);
}

struct SequenceLogprobs : public torch::autograd::Function<SequenceLogprobs> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& token_logprobs,
                               const std::optional<at::Tensor>& mask, bool average) {
    auto [logprobs, counts] = sequence_op(token_logprobs, mask, average);
    ctx->save_for_backward({mask.value_or(at::Tensor()), counts});
    ctx->saved_data["average"] = average;
    ctx->saved_data["T"] = token_logprobs.sym_size(1);
    ctx->saved_data["dtype"] = static_cast<int64_t>(token_logprobs.scalar_type());
    ctx->mark_non_differentiable({counts});
    ctx->set_materialize_grads(false);
    return {logprobs, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(3);
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& mask = saved[0];
    const at::Tensor& counts = saved[1];
    const bool average = ctx->saved_data["average"].toBool();
    // The op takes a plain int: a symbolic T (torch.compile, dynamic shapes) is specialised.
    const int64_t T = ctx->saved_data["T"].toSymInt().guard_int(__FILE__, __LINE__);
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    if (recording()) {
      out[0] = python_backward("sequence_logprobs", grads[0], mask, counts, average, T)[0].to(dtype);
      return out;
    }
    static const auto backward_op = op<SequenceBackwardSig>("rlkernels::sequence_logprobs_backward");
    std::optional<at::Tensor> maybe_mask;
    if (mask.defined()) maybe_mask = mask;
    at::AutoDispatchBelowADInplaceOrView below;
    out[0] = backward_op.call(grads[0].to(counts.scalar_type()).contiguous(), maybe_mask, counts, average, T, dtype);
    return out;
  }
};

SequenceOutputs sequence_logprobs_autograd(const at::Tensor& token_logprobs, const std::optional<at::Tensor>& mask,
                                           bool average) {
  if (!wants_grad({&token_logprobs, maybe(mask)})) return sequence_op(token_logprobs, mask, average);
  auto out = SequenceLogprobs::apply(token_logprobs, mask, average);
  return {out[0], out[1]};
}

// ---- dpo_sequence_loss: the forward saves coef per row; the backward writes it per token ----

using DpoSequenceSig = DpoOutputs(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                                  c10::string_view, double, bool);
using DpoSequenceBackwardSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                          double, int64_t, at::ScalarType);

DpoOutputs dpo_sequence_op(const at::Tensor& policy, const at::Tensor& ref, const std::optional<at::Tensor>& mask,
                           double beta, c10::string_view kind, double label_smoothing, bool average) {
  static const auto handle = op<DpoSequenceSig>("rlkernels::dpo_sequence_loss");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(policy, ref, mask, beta, kind, label_smoothing, average);
}

struct DpoSequenceLoss : public torch::autograd::Function<DpoSequenceLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& policy, const at::Tensor& ref,
                               const std::optional<at::Tensor>& mask, double beta, c10::string_view kind,
                               double label_smoothing, bool average) {
    auto [losses, chosen_rewards, rejected_rewards, coef] =
        dpo_sequence_op(policy, ref, mask, beta, kind, label_smoothing, average);
    ctx->save_for_backward({coef, mask.value_or(at::Tensor()), policy, ref});  // the inputs for first_order_only
    // The op takes a plain int: a symbolic T (torch.compile, dynamic shapes) is specialised in backward.
    ctx->saved_data["T"] = policy.sym_size(1);
    ctx->mark_non_differentiable({chosen_rewards, rejected_rewards, coef});
    ctx->set_materialize_grads(false);
    return {losses, chosen_rewards, rejected_rewards, coef};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& coef = saved[0];
    std::optional<at::Tensor> mask;
    if (saved[1].defined()) mask = saved[1];
    const int64_t T = ctx->saved_data["T"].toSymInt().guard_int(__FILE__, __LINE__);
    const at::Tensor grad_losses = grads[0].to(coef.scalar_type());
    static const auto backward_op = op<DpoSequenceBackwardSig>("rlkernels::dpo_sequence_loss_backward");
    variable_list input_grads(2);
    {
      at::AutoDispatchBelowADInplaceOrView below;
      const double scales[2] = {1.0, -1.0};  // the reference rows enter z with the opposite sign
      for (int i = 0; i < 2; ++i) {
        if (!ctx->needs_input_grad(i)) continue;
        input_grads[i] = backward_op.call(grad_losses, mask, coef, scales[i], T, saved[2 + i].scalar_type());
      }
    }
    input_grads = first_order_only("dpo_sequence_loss", std::move(input_grads), {saved[2], saved[3]});
    out[0] = input_grads[0];
    out[1] = input_grads[1];
    return out;
  }
};

DpoOutputs dpo_sequence_loss_autograd(const at::Tensor& policy, const at::Tensor& ref,
                                      const std::optional<at::Tensor>& mask, double beta, c10::string_view kind,
                                      double label_smoothing, bool average) {
  if (!wants_grad({&policy, &ref})) return dpo_sequence_op(policy, ref, mask, beta, kind, label_smoothing, average);
  auto out = DpoSequenceLoss::apply(policy, ref, mask, beta, kind, label_smoothing, average);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) {
  m.impl("dpo_sequence_loss", &rlk::autograd::dpo_sequence_loss_autograd);
  m.impl("dpo_loss", &rlk::autograd::dpo_loss_autograd);
  m.impl("sequence_logprobs", &rlk::autograd::sequence_logprobs_autograd);
}
