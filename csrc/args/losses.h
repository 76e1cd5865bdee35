// Torch-side argument handling shared by the CPU and CUDA implementations of
// the token-level losses.  The Python layer validates with messages naming
// the argument; these checks only keep direct torch.ops calls memory-safe.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <string>

#include "../core/loss_agg.h"
#include "../core/policy_loss.h"
#include "../core/preference.h"
#include "../torch_common.h"

namespace rlk {

inline Agg parse_agg(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "token-mean") return Agg::token_mean;
  if (name == "token-sum") return Agg::token_sum;
  if (name == "seq-mean-token-sum") return Agg::seq_mean_token_sum;
  if (name == "seq-mean-token-mean") return Agg::seq_mean_token_mean;
  if (name == "seq-mean-token-sum-norm") return Agg::seq_mean_token_sum_norm;
  TORCH_CHECK(false, "unknown agg ", name);
}

inline KLKind parse_kl(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "none") return KLKind::none;
  if (name == "k1") return KLKind::k1;
  if (name == "k2") return KLKind::k2;
  if (name == "k3") return KLKind::k3;
  TORCH_CHECK(false, "unknown kl estimator ", name);
}

inline PreferenceKind parse_preference_kind(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "sigmoid") return PreferenceKind::sigmoid;
  if (name == "ipo") return PreferenceKind::ipo;
  if (name == "hinge") return PreferenceKind::hinge;
  if (name == "robust") return PreferenceKind::robust;
  TORCH_CHECK(false, "unknown preference loss kind ", name);
}

inline void check_pairs(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0) && t.is_contiguous(), name,
              " must be a contiguous [B] tensor like policy_chosen");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of policy_chosen");
  check_same_device(like, t, name);
}

// Checks shared by every backend of dpo_loss; returns the loss kind.
inline PreferenceKind check_dpo_loss(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                     const at::Tensor& ref_chosen, const at::Tensor& ref_rejected,
                                     c10::string_view kind) {
  TORCH_CHECK(policy_chosen.dim() == 1, "policy_chosen must be [B], got ", policy_chosen.sizes());
  check_pairs(policy_chosen, "policy_chosen", policy_chosen);
  check_pairs(policy_rejected, "policy_rejected", policy_chosen);
  check_pairs(ref_chosen, "ref_chosen", policy_chosen);
  check_pairs(ref_rejected, "ref_rejected", policy_chosen);
  return parse_preference_kind(kind);
}

// sequence_logprobs: [B, T] token log-probs; returns the mask pointer.
inline const uint8_t* check_sequence_logprobs(const at::Tensor& token_logprobs,
                                              const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(token_logprobs.dim() == 2, "token_logprobs must be [B, T], got ", token_logprobs.sizes());
  const int64_t B = token_logprobs.size(0), T = token_logprobs.size(1);
  check_rows(token_logprobs, "token_logprobs", B, T);
  check_same_device(token_logprobs, mask, "mask");
  return optional_bool_ptr(mask, "mask", B, T);
}

// sequence_logprobs_backward: grad and num_tokens [B] in the accumulation dtype
// of `dtype`; returns the mask pointer.
inline const uint8_t* check_sequence_logprobs_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& mask,
                                                       const at::Tensor& num_tokens, int64_t T,
                                                       at::ScalarType dtype) {
  TORCH_CHECK(grad.dim() == 1 && grad.is_contiguous(), "grad must be a contiguous [B] tensor");
  const int64_t B = grad.size(0);
  TORCH_CHECK(num_tokens.dim() == 1 && num_tokens.size(0) == B && num_tokens.scalar_type() == grad.scalar_type() &&
                  num_tokens.is_contiguous(), "num_tokens must be a contiguous [B] tensor of grad's dtype");
  TORCH_CHECK(grad.scalar_type() == out_dtype_for(dtype), "grad must be ", out_dtype_for(dtype));
  check_same_device(grad, mask, "mask");
  check_same_device(grad, num_tokens, "num_tokens");
  return optional_bool_ptr(mask, "mask", B, T);
}

// The scalar arguments of policy_loss / value_loss (see registration.cpp).
struct PolicyCoefficients {
  double clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, num_tokens, num_seqs, norm_length;
};
struct ValueCoefficients {
  double clip, num_tokens, num_seqs, norm_length;
};

inline PolicyCoefficients policy_coefficients(c10::ArrayRef<double> c) {
  TORCH_CHECK(c.size() == 8, "policy_loss takes 8 coefficients, got ", c.size());
  return {c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]};
}

inline ValueCoefficients value_coefficients(c10::ArrayRef<double> c) {
  TORCH_CHECK(c.size() == 4, "value_loss takes 4 coefficients, got ", c.size());
  return {c[0], c[1], c[2], c[3]};
}

// [B, T] input of the loss's dtype, or a per-row [B] input when `per_row_ok`.
// Returns whether it is per-row.
inline bool check_token_input(const at::Tensor& t, const char* name, const at::Tensor& like,
                              bool per_row_ok = false) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the inputs are on ",
              like.device());
  if (per_row_ok && t.dim() == 1) {
    TORCH_CHECK(t.size(0) == like.size(0) && t.is_contiguous(), name,
                " must be a contiguous [B] or [B, T] tensor");
    return true;
  }
  check_rows(t, name, like.size(0), like.size(1));
  return false;
}

// Checks shared by every backend of policy_loss and value_loss.
struct TokenLossArgs {
  int64_t B, T;
  const uint8_t* mask;
  Agg agg;
};

inline TokenLossArgs check_token_loss(const at::Tensor& x, const char* name,
                                      const c10::optional<at::Tensor>& mask, c10::string_view agg) {
  TORCH_CHECK(x.dim() == 2, name, " must be [B, T], got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1);
  check_rows(x, name, B, T);
  check_same_device(x, mask, "mask");
  return {B, T, optional_bool_ptr(mask, "mask", B, T), parse_agg(agg)};
}

struct PolicyArgs {
  TokenLossArgs rows;
  bool advantages_per_row;
  KLKind kl;
};

inline PolicyArgs check_policy_loss(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                    const at::Tensor& advantages, const c10::optional<at::Tensor>& mask,
                                    const c10::optional<at::Tensor>& weights,
                                    const c10::optional<at::Tensor>& ref_logprobs, c10::string_view kl,
                                    c10::string_view agg) {
  const TokenLossArgs rows = check_token_loss(logprobs, "logprobs", mask, agg);
  check_token_input(old_logprobs, "old_logprobs", logprobs);
  const bool per_row = check_token_input(advantages, "advantages", logprobs, /*per_row_ok=*/true);
  if (weights.has_value()) check_token_input(*weights, "weights", logprobs);
  const KLKind kind = parse_kl(kl);
  TORCH_CHECK(kind == KLKind::none || ref_logprobs.has_value(), "a KL estimator needs ref_logprobs");
  if (ref_logprobs.has_value()) check_token_input(*ref_logprobs, "ref_logprobs", logprobs);
  return {rows, per_row, kind};
}

inline TokenLossArgs check_value_loss(const at::Tensor& values, const at::Tensor& old_values,
                                      const at::Tensor& returns, const c10::optional<at::Tensor>& mask,
                                      c10::string_view agg) {
  const TokenLossArgs rows = check_token_loss(values, "values", mask, agg);
  check_token_input(old_values, "old_values", values);
  check_token_input(returns, "returns", values);
  return rows;
}

struct TokenLossOutputs {
  at::Tensor loss, stats, grad, row_scale;
};

inline TokenLossOutputs token_loss_outputs(const at::Tensor& like, int64_t num_stats, bool need_grad) {
  const auto opts = like.options().dtype(out_dtype_for(like.scalar_type()));
  const int64_t B = like.size(0), T = like.size(1);
  TokenLossOutputs out;
  out.loss = at::empty({}, opts);
  out.stats = at::empty({num_stats}, opts);
  out.grad = need_grad ? at::empty({B, T}, opts) : at::empty({0}, opts);
  out.row_scale = at::empty({B}, opts);
  return out;
}

// Checks the arguments of scale_rows (the losses' backward: out[b, t] = grad[b, t] *
// row_scale[b] * grad_loss) and returns its [B, T] output in `dtype`.
inline at::Tensor scale_rows_output(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& grad_loss,
                                    at::ScalarType dtype) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "grad must be a contiguous [B, T] tensor");
  const int64_t B = grad.size(0), T = grad.size(1);
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == B && row_scale.is_contiguous() &&
                  row_scale.scalar_type() == grad.scalar_type(), "row_scale must be a contiguous [B] tensor like grad");
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value");
  TORCH_CHECK(grad.scalar_type() == out_dtype_for(dtype), "grad must be ", out_dtype_for(dtype));
  check_same_device(grad, row_scale, "row_scale");
  check_same_device(grad, grad_loss, "grad_loss");
  return at::empty({B, T}, grad.options().dtype(dtype));
}

}  // namespace rlk
