// dpo_loss, sequence_logprobs and dpo_sequence_loss (with their backwards): checks, outputs and the
// params both backends read (the Python layer validates first, naming the
// argument).
#pragma once
#include <string>

#include "../core/preference.h"
#include "../torch_common.h"

namespace rlk {

inline PreferenceKind parse_preference_kind(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "sigmoid") return PreferenceKind::sigmoid;
  if (name == "ipo") return PreferenceKind::ipo;
  if (name == "hinge") return PreferenceKind::hinge;
  if (name == "robust") return PreferenceKind::robust;
  TORCH_CHECK(false, "unknown preference loss kind ", name);
}

inline const void* pair_data(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0) && t.is_contiguous(), name,
              " must be a contiguous [B] tensor like policy_chosen");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of policy_chosen");
  check_same_device(like, t, name);
  return t.data_ptr();
}

struct PreferenceOutputs {
  at::Tensor losses, chosen_rewards, rejected_rewards, dlogits;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {losses, chosen_rewards, rejected_rewards, dlogits};
  }
};

inline PreferenceParams dpo_loss_args(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                      const at::Tensor& ref_chosen, const at::Tensor& ref_rejected, double beta,
                                      c10::string_view kind, double label_smoothing, PreferenceOutputs& out) {
  TORCH_CHECK(policy_chosen.dim() == 1, "policy_chosen must be [B], got ", policy_chosen.sizes());
  PreferenceParams p;
  p.policy_chosen = pair_data(policy_chosen, "policy_chosen", policy_chosen);
  p.policy_rejected = pair_data(policy_rejected, "policy_rejected", policy_chosen);
  p.ref_chosen = pair_data(ref_chosen, "ref_chosen", policy_chosen);
  p.ref_rejected = pair_data(ref_rejected, "ref_rejected", policy_chosen);
  p.kind = parse_preference_kind(kind);
  p.dtype = dtype_of(policy_chosen.scalar_type(), "dpo_loss");
  p.B = policy_chosen.size(0);
  p.beta = beta;
  p.label_smoothing = label_smoothing;
  out.losses = empty_acc({p.B}, policy_chosen);
  out.chosen_rewards = empty_acc({p.B}, policy_chosen);
  out.rejected_rewards = empty_acc({p.B}, policy_chosen);
  out.dlogits = empty_acc({p.B}, policy_chosen);
  p.losses = out.losses.data_ptr();
  p.chosen_rewards = out.chosen_rewards.data_ptr();
  p.rejected_rewards = out.rejected_rewards.data_ptr();
  p.dlogits = out.dlogits.data_ptr();
  return p;
}

// sequence_logprobs: [B, T] token log-probs -> per-row sums (or means) and counts.
inline SequenceLogprobsParams sequence_logprobs_args(const at::Tensor& token_logprobs,
                                                     const c10::optional<at::Tensor>& mask, bool average,
                                                     at::Tensor& sums, at::Tensor& counts) {
  TORCH_CHECK(token_logprobs.dim() == 2, "token_logprobs must be [B, T], got ", token_logprobs.sizes());
  SequenceLogprobsParams p;
  p.B = token_logprobs.size(0);
  p.T = token_logprobs.size(1);
  check_rows(token_logprobs, "token_logprobs", p.B, p.T);
  check_same_device(token_logprobs, mask, "mask");
  p.mask = optional_bool_ptr(mask, "mask", p.B, p.T);
  p.dtype = dtype_of(token_logprobs.scalar_type(), "sequence_logprobs");
  p.average = average;
  p.token_logprobs = token_logprobs.data_ptr();
  sums = empty_acc({p.B}, token_logprobs);
  counts = empty_acc({p.B}, token_logprobs);
  p.sums = sums.data_ptr();
  p.counts = counts.data_ptr();
  return p;
}

// Its backward: grad and num_tokens [B] in the accumulation dtype of `dtype`,
// the [B, T] gradient out in `dtype`.
inline SequenceLogprobsParams sequence_logprobs_backward_args(const at::Tensor& grad,
                                                              const c10::optional<at::Tensor>& mask,
                                                              const at::Tensor& num_tokens, bool average, int64_t T,
                                                              at::ScalarType dtype, at::Tensor& out) {
  TORCH_CHECK(grad.dim() == 1 && grad.is_contiguous(), "grad must be a contiguous [B] tensor");
  SequenceLogprobsParams p;
  p.B = grad.size(0);
  p.T = T;
  TORCH_CHECK(num_tokens.dim() == 1 && num_tokens.size(0) == p.B && num_tokens.scalar_type() == grad.scalar_type() &&
                  num_tokens.is_contiguous(), "num_tokens must be a contiguous [B] tensor of grad's dtype");
  TORCH_CHECK(grad.scalar_type() == out_dtype_for(dtype), "grad must be ", out_dtype_for(dtype));
  check_same_device(grad, mask, "mask");
  check_same_device(grad, num_tokens, "num_tokens");
  p.mask = optional_bool_ptr(mask, "mask", p.B, T);
  p.dtype = dtype_of(dtype, "sequence_logprobs_backward");
  p.average = average;
  p.grad = grad.data_ptr();
  p.num_tokens = num_tokens.data_ptr();
  out = at::empty({p.B, T}, grad.options().dtype(dtype));
  p.grad_tokens = out.data_ptr();
  return p;
}

// dpo_sequence_loss: [2B, T] policy and reference token log-probs of one dtype, an
// optional bool mask of that shape -> [B] losses and rewards, [2B] coef.
inline DpoSequenceParams dpo_sequence_loss_args(const at::Tensor& policy_logprobs, const at::Tensor& ref_logprobs,
                                                const c10::optional<at::Tensor>& mask, double beta,
                                                c10::string_view kind, double label_smoothing, bool average,
                                                PreferenceOutputs& out) {
  TORCH_CHECK(policy_logprobs.dim() == 2, "policy_logprobs must be [2B, T], got ", policy_logprobs.sizes());
  const int64_t rows = policy_logprobs.size(0);
  TORCH_CHECK(rows % 2 == 0, "policy_logprobs must have an even number of rows (chosen, then rejected), got ",
              rows);
  DpoSequenceParams p;
  p.B = rows / 2;
  p.T = policy_logprobs.size(1);
  check_rows(policy_logprobs, "policy_logprobs", rows, p.T);
  check_rows(ref_logprobs, "ref_logprobs", rows, p.T);
  TORCH_CHECK(ref_logprobs.scalar_type() == policy_logprobs.scalar_type(),
              "ref_logprobs must have the dtype of policy_logprobs");
  check_same_device(policy_logprobs, ref_logprobs, "ref_logprobs");
  check_same_device(policy_logprobs, mask, "mask");
  p.mask = optional_bool_ptr(mask, "mask", rows, p.T);
  p.dtype = dtype_of(policy_logprobs.scalar_type(), "dpo_sequence_loss");
  p.policy_logprobs = policy_logprobs.data_ptr();
  p.ref_logprobs = ref_logprobs.data_ptr();
  p.kind = parse_preference_kind(kind);
  p.beta = beta;
  p.label_smoothing = label_smoothing;
  p.average = average;
  out.losses = empty_acc({p.B}, policy_logprobs);
  out.chosen_rewards = empty_acc({p.B}, policy_logprobs);
  out.rejected_rewards = empty_acc({p.B}, policy_logprobs);
  out.dlogits = empty_acc({rows}, policy_logprobs);  // the coef output
  p.losses = out.losses.data_ptr();
  p.chosen_rewards = out.chosen_rewards.data_ptr();
  p.rejected_rewards = out.rejected_rewards.data_ptr();
  p.coef = out.dlogits.data_ptr();
  return p;
}

// Its backward: grad_losses [B] (any stride: the gradient of losses.mean() is an
// expanded scalar) and coef [2B] in the accumulation dtype of `dtype`, the [2B, T]
// gradient out in `dtype`.
inline DpoSequenceParams dpo_sequence_loss_backward_args(const at::Tensor& grad_losses,
                                                         const c10::optional<at::Tensor>& mask,
                                                         const at::Tensor& coef, double scale, int64_t T,
                                                         at::ScalarType dtype, at::Tensor& out) {
  TORCH_CHECK(grad_losses.dim() == 1, "grad_losses must be [B], got ", grad_losses.sizes());
  DpoSequenceParams p;
  p.B = grad_losses.size(0);
  p.T = T;
  TORCH_CHECK(T >= 0, "T must be >= 0, got ", T);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == 2 * p.B && coef.is_contiguous(),
              "coef must be a contiguous [2B] tensor for grad_losses [B]");
  TORCH_CHECK(grad_losses.scalar_type() == out_dtype_for(dtype) && coef.scalar_type() == grad_losses.scalar_type(),
              "grad_losses and coef must be ", out_dtype_for(dtype));
  check_same_device(grad_losses, coef, "coef");
  check_same_device(grad_losses, mask, "mask");
  p.mask = optional_bool_ptr(mask, "mask", 2 * p.B, T);
  p.dtype = dtype_of(dtype, "dpo_sequence_loss_backward");
  p.grad_losses = grad_losses.data_ptr();
  p.grad_stride = grad_losses.stride(0);
  p.coef = coef.data_ptr();
  p.scale = scale;
  out = at::empty({2 * p.B, T}, grad_losses.options().dtype(dtype));
  p.grad_tokens = out.data_ptr();
  return p;
}

}  // namespace rlk
