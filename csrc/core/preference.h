// Per-pair math of the direct preference losses, shared by the CPU and CUDA
// kernels.  With z = logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
// (TRL's order of operations) and ls the label smoothing:
//   sigmoid (DPO, Rafailov et al. 2023; cDPO smoothing):
//            -(1 - ls) logsigmoid(beta z) - ls logsigmoid(-beta z)
//   robust  (rDPO, Chowdhury et al. 2024):
//            (-(1 - ls) logsigmoid(beta z) + ls logsigmoid(-beta z)) / (1 - 2 ls)
//   hinge   (SLiC, Zhao et al. 2023):  relu(1 - beta z)
//   ipo     (IPO, Azar et al. 2023):    (z - 1 / (2 beta))^2
// rewards: beta (pi_chosen - ref_chosen) and beta (pi_rejected - ref_rejected).
#pragma once
#include <cmath>

#include "common.h"
#include "vec_math.h"

namespace rlk {

enum class PreferenceKind : int { sigmoid = 0, ipo = 1, hinge = 2, robust = 3 };

RLK_INLINE float log1p_acc(float x) { return ::log1pf(x); }
RLK_INLINE double log1p_acc(double x) { return ::log1p(x); }

// log(sigmoid(x)) without overflow: min(x, 0) - log1p(exp(-|x|)).
template <typename acc>
RLK_INLINE acc log_sigmoid(acc x) {
  const acc e = exp_acc(x < acc(0) ? x : -x);
  return (x < acc(0) ? x : acc(0)) - log1p_acc(e);
}

template <typename acc>
RLK_INLINE acc sigmoid(acc x) {
  const acc e = exp_acc(x < acc(0) ? x : -x);
  return x < acc(0) ? e / (acc(1) + e) : acc(1) / (acc(1) + e);
}

template <typename acc>
struct PreferencePair {
  acc loss;
  acc dlogits;  // d loss / d z
  acc chosen_reward, rejected_reward;
};

template <typename acc>
RLK_INLINE PreferencePair<acc> preference_pair(PreferenceKind kind, acc beta, acc label_smoothing,
                                               acc policy_chosen, acc policy_rejected, acc ref_chosen,
                                               acc ref_rejected) {
  PreferencePair<acc> out;
  const acc logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected);
  const acc z = beta * logits;
  const acc ls = label_smoothing;
  switch (kind) {
    case PreferenceKind::sigmoid:
      out.loss = -(acc(1) - ls) * log_sigmoid(z) - ls * log_sigmoid(-z);
      out.dlogits = beta * (-(acc(1) - ls) * sigmoid(-z) + ls * sigmoid(z));
      break;
    case PreferenceKind::robust:
      out.loss = (-(acc(1) - ls) * log_sigmoid(z) + ls * log_sigmoid(-z)) / (acc(1) - acc(2) * ls);
      out.dlogits = beta * (-(acc(1) - ls) * sigmoid(-z) - ls * sigmoid(z)) / (acc(1) - acc(2) * ls);
      break;
    case PreferenceKind::hinge: {
      const acc margin = acc(1) - z;
      out.loss = margin < acc(0) ? acc(0) : margin;  // relu that keeps NaN
      out.dlogits = margin > acc(0) ? -beta : acc(0);  // relu's gradient at 0 is 0
      break;
    }
    case PreferenceKind::ipo: {
      const acc d = logits - acc(1) / (acc(2) * beta);
      out.loss = d * d;
      out.dlogits = acc(2) * d;
      break;
    }
  }
  out.chosen_reward = beta * (policy_chosen - ref_chosen);
  out.rejected_reward = beta * (policy_rejected - ref_rejected);
  return out;
}

// The arguments of dpo_loss, filled once by args/preference.h: [B] inputs of
// `dtype`, [B] outputs in its accumulation type.
struct PreferenceParams {
  int64_t B = 0;
  Dtype dtype = Dtype::f32;
  const void* policy_chosen = nullptr;
  const void* policy_rejected = nullptr;
  const void* ref_chosen = nullptr;
  const void* ref_rejected = nullptr;
  PreferenceKind kind = PreferenceKind::sigmoid;
  double beta = 0, label_smoothing = 0;
  void* losses = nullptr;
  void* chosen_rewards = nullptr;
  void* rejected_rewards = nullptr;
  void* dlogits = nullptr;
};

// The arguments of sequence_logprobs (forward: token_logprobs of `dtype` in,
// sums and counts out in its accumulation type) and of its backward (grad and
// num_tokens in the accumulation type of `dtype`, grad_tokens out in `dtype`).
struct SequenceLogprobsParams {
  int64_t B = 0, T = 0;
  Dtype dtype = Dtype::f32;
  const uint8_t* mask = nullptr;  // [B, T], may be null
  bool average = false;
  const void* token_logprobs = nullptr;
  void* sums = nullptr;
  void* counts = nullptr;
  const void* grad = nullptr;
  const void* num_tokens = nullptr;
  void* grad_tokens = nullptr;
};

// d loss / d token_logprobs[r, t] on a valid token of a pair's chosen (sign +1) or
// rejected (sign -1) row: the pair's dlogits through the row's sum (or mean: over
// `count` tokens, 0 for a row without any).  The reference rows take its negative.
template <typename acc>
RLK_INLINE acc sequence_coef(acc dlogits, acc sign, bool average, acc count) {
  if (!average) return sign * dlogits;
  return count > acc(0) ? sign * dlogits / count : acc(0);
}

// The arguments of dpo_sequence_loss, the whole DPO step from token log-probs in
// TRL's concatenated layout: policy and reference [2B, T] of `dtype` (rows
// [0, B) chosen, [B, 2B) rejected) and one mask for both; [B] losses and rewards
// and the [2B] per-row gradient coefficients (sequence_coef) out in its
// accumulation type.  Its backward reads grad_losses ([B], element stride
// grad_stride) and coef, and writes grad_tokens [2B, T] in `dtype`:
// scale * grad_losses[r mod B] * coef[r] on valid tokens, 0 elsewhere.
struct DpoSequenceParams {
  int64_t B = 0, T = 0;  // B pairs: 2B rows
  Dtype dtype = Dtype::f32;
  const uint8_t* mask = nullptr;  // [2B, T], may be null
  const void* policy_logprobs = nullptr;
  const void* ref_logprobs = nullptr;
  PreferenceKind kind = PreferenceKind::sigmoid;
  double beta = 0, label_smoothing = 0;
  bool average = false;
  void* losses = nullptr;
  void* chosen_rewards = nullptr;
  void* rejected_rewards = nullptr;
  void* coef = nullptr;
  const void* grad_losses = nullptr;
  int64_t grad_stride = 1;
  double scale = 1;
  void* grad_tokens = nullptr;
};

// The CUDA launchers (preference.cu).
RLK_CUDA_LAUNCHER(launch_dpo_sequence_loss, DpoSequenceParams)
RLK_CUDA_LAUNCHER(launch_dpo_sequence_loss_backward, DpoSequenceParams)
RLK_CUDA_LAUNCHER(launch_dpo_loss, PreferenceParams)
RLK_CUDA_LAUNCHER(launch_sequence_logprobs, SequenceLogprobsParams)
RLK_CUDA_LAUNCHER(launch_sequence_logprobs_backward, SequenceLogprobsParams)

}  // namespace rlk
