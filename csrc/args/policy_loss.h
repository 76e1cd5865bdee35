// policy_loss: checks, outputs and the one PolicyLossParams both backends
// read.  Its scalars arrive as one list (see registration.cpp).
#pragma once
#include <string>

#include "../core/policy_loss.h"
#include "token_loss.h"

namespace rlk {

inline KLKind parse_kl(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "none") return KLKind::none;
  if (name == "k1") return KLKind::k1;
  if (name == "k2") return KLKind::k2;
  if (name == "k3") return KLKind::k3;
  TORCH_CHECK(false, "unknown kl estimator ", name);
}

inline PolicyLossParams policy_loss_args(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                         const at::Tensor& advantages, const c10::optional<at::Tensor>& mask,
                                         const c10::optional<at::Tensor>& weights,
                                         const c10::optional<at::Tensor>& ref_logprobs,
                                         c10::ArrayRef<double> coefficients, c10::string_view kl,
                                         c10::string_view agg, bool need_grad, TokenLossOutputs& out) {
  // [clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, num_tokens, num_seqs, norm_length],
  // with inf for "off" (dual_clip, log_ratio_clamp) and -1 for "count it" (num_tokens,
  // num_seqs; norm_length -1 means T)
  const auto& c = coefficients;
  TORCH_CHECK(c.size() == 8, "policy_loss takes 8 coefficients, got ", c.size());
  PolicyLossParams p;
  p.clip_low = c[0];
  p.clip_high = c[1];
  p.dual_clip = c[2];
  p.log_ratio_clamp = c[3];
  p.kl_coef = c[4];
  p.rows = token_loss_args(logprobs, "logprobs", mask, agg, c[5], c[6], c[7], kPolicyStats, need_grad, "policy_loss",
                           out);
  check_token_input(old_logprobs, "old_logprobs", logprobs);
  p.advantages_per_row = check_token_input(advantages, "advantages", logprobs, /*per_row_ok=*/true);
  if (weights.has_value()) check_token_input(*weights, "weights", logprobs);
  p.kl = parse_kl(kl);
  TORCH_CHECK(p.kl == KLKind::none || ref_logprobs.has_value(), "a KL estimator needs ref_logprobs");
  if (ref_logprobs.has_value()) check_token_input(*ref_logprobs, "ref_logprobs", logprobs);
  p.logprobs = logprobs.data_ptr();
  p.old_logprobs = old_logprobs.data_ptr();
  p.advantages = advantages.data_ptr();
  p.weights = optional_data(weights);
  p.ref_logprobs = optional_data(ref_logprobs);
  return p;
}

}  // namespace rlk
