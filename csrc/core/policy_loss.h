// Per-token math of the clipped policy-gradient surrogate (PPO, GRPO, DAPO)
// with its derivative, shared by the CPU and CUDA kernels.
//
//   log_ratio = clamp(logprob - old_logprob, -c, c)      (c = log_ratio_clamp)
//   ratio     = exp(log_ratio)
//   L         = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))
//   dual clip (A < 0):  L = min(L, -A dual_clip)
//   L         = weight L + kl_coef KL(logprob, ref_logprob)
// KL estimators of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3,
// as TRL and verl write them, without clamps):
//   k1 = lp - ref,  k2 = (lp - ref)^2 / 2,  k3 = exp(ref - lp) - (ref - lp) - 1
// The derivative follows PyTorch's subgradient conventions (clamp passes the
// gradient on its closed interval; max/min split it on ties) so that fused
// and composed gradients agree bit for bit in structure.
#pragma once
#include <limits>

#include <math.h>

#include "common.h"
#include "token_loss.h"
#include "vec_math.h"

namespace rlk {

enum class KLKind : int { none = 0, k1 = 1, k2 = 2, k3 = 3 };

// Slots of the per-row partial sums (after kSlotLoss, kSlotTokens).
constexpr int kPolicyClipUpper = 2;  // A > 0 and ratio > 1 + clip_high
constexpr int kPolicyClipLower = 3;  // A < 0 and ratio < 1 - clip_low
constexpr int kPolicyClipDual = 4;   // A < 0 and the dual clip caps L
constexpr int kPolicyK1 = 5;         // old - lp: approx KL(old || new)
constexpr int kPolicyK3 = 6;         // ratio - 1 - log_ratio
constexpr int kPolicyRatioSum = 7;
constexpr int kPolicyRatioMax = 8;   // the one slot reduced with max
constexpr int kPolicyRefKL = 9;      // the KL estimator against the reference
constexpr int kPolicySlots = 10;
// stats output: clip_frac_upper, clip_frac_lower, clip_frac_dual,
// approx_kl_k1, approx_kl_k3, ratio_mean, ratio_max, kl, num_tokens
constexpr int kPolicyStats = 9;

// The arguments of policy_loss, filled once by args/policy_loss.h; the
// coefficients are doubles, converted to the accumulation type where used.
struct PolicyLossParams {
  TokenLossParams rows;
  const void* logprobs = nullptr;
  const void* old_logprobs = nullptr;
  const void* advantages = nullptr;    // [B, T], or [B] with advantages_per_row
  bool advantages_per_row = false;
  const void* weights = nullptr;       // may be null (weight 1)
  const void* ref_logprobs = nullptr;  // may be null; read only with a KL estimator
  KLKind kl = KLKind::none;
  double clip_low = 0.2, clip_high = 0.2;
  double dual_clip = INFINITY;         // +inf when off
  double log_ratio_clamp = INFINITY;   // +inf when off
  double kl_coef = 0;
};

template <typename acc>
struct PolicyToken {
  acc loss;
  acc grad;  // d loss / d logprob
  acc clip_upper, clip_lower, clip_dual;  // 0 or 1
  acc k1, k3, ratio, kl;
};

template <int kKL, typename acc>
RLK_FORCE_INLINE PolicyToken<acc> policy_token(acc logprob, acc old_logprob, acc advantage, acc weight,
                                         acc ref_logprob, const PolicyLossParams& p) {
  PolicyToken<acc> out;
  const acc ratio_low = acc(1.0 - p.clip_low), ratio_high = acc(1.0 + p.clip_high);
  const acc raw = logprob - old_logprob;
  const acc c = acc(p.log_ratio_clamp);
  const acc pass = ((raw >= -c) & (raw <= c)) ? acc(1) : acc(0);
  acc log_ratio = raw < -c ? -c : raw;
  log_ratio = log_ratio > c ? c : log_ratio;
  const acc ratio = exp_acc(log_ratio);
  acc clipped = ratio < ratio_low ? ratio_low : ratio;
  clipped = clipped > ratio_high ? ratio_high : clipped;
  const acc unclipped_loss = -advantage * ratio;
  const acc clipped_loss = -advantage * clipped;
  // On a tie both branches have slope -A (clamp passes on its closed
  // interval, and outside it a tie needs A = 0), so only a strict win of the
  // constant clipped branch changes the slope.
  const bool clip_wins = clipped_loss > unclipped_loss;
  acc loss = clip_wins ? clipped_loss : unclipped_loss;
  acc slope = clip_wins ? acc(0) : -advantage;  // d L / d ratio
  // With the dual clip off, cap = +inf for A < 0 never binds (and the NaN
  // that 0 * inf gives for A = 0 is excluded by `negative`).  The flags are
  // 0/1 values, not bools, so that vectorised selects stay float-typed.
  const bool negative = advantage < acc(0);
  const acc cap = -advantage * acc(p.dual_clip);
  const acc capped = (negative & (loss > cap)) ? acc(1) : acc(0);
  const acc tie = (negative & (loss == cap)) ? acc(1) : acc(0);
  loss = capped > acc(0) ? cap : loss;
  slope = slope * (acc(1) - capped - acc(0.5) * tie);
  out.loss = weight * loss;
  // A constant branch has slope exactly 0, even where the ratio overflowed to
  // inf (autograd's 0 * inf would give NaN there).
  out.grad = weight * (slope == acc(0) ? acc(0) : slope * ratio) * pass;
  out.clip_upper = ((advantage > acc(0)) & (ratio > ratio_high)) ? acc(1) : acc(0);
  out.clip_lower = (negative & (ratio < ratio_low)) ? acc(1) : acc(0);
  out.clip_dual = capped;
  out.k1 = -log_ratio;
  out.k3 = ratio - acc(1) - log_ratio;
  out.ratio = ratio;
  out.kl = acc(0);
  if (kKL != int(KLKind::none)) {
    const acc diff = logprob - ref_logprob;
    acc kl, dkl;
    if (kKL == int(KLKind::k1)) {
      kl = diff;
      dkl = acc(1);
    } else if (kKL == int(KLKind::k2)) {
      kl = acc(0.5) * diff * diff;
      dkl = diff;
    } else {
      const acc e = exp_acc(-diff);
      kl = e + diff - acc(1);
      dkl = acc(1) - e;
    }
    out.kl = kl;
    out.loss += acc(p.kl_coef) * kl;
    out.grad += acc(p.kl_coef) * dkl;
  }
  return out;
}

// The CUDA launchers (policy_loss.cu).
RLK_CUDA_LAUNCHER(launch_policy_loss, PolicyLossParams)

}  // namespace rlk
