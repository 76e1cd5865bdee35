// Preference losses on the CPU: dpo_loss over per-pair sequence log-probs,
// sequence_logprobs, the masked per-row sums (or means) that feed it, and
// dpo_sequence_loss, the two fused into one pass from token log-probs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "parallel.h"
#include "../core/preference.h"
#include "../args/preference.h"
#include "masked_sum.h"
#include "simd_loops.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_cpu(
    const at::Tensor& policy_chosen, const at::Tensor& policy_rejected, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, double beta, c10::string_view kind, double label_smoothing) {
  PreferenceOutputs out;
  const PreferenceParams p =
      dpo_loss_args(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind, label_smoothing, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, policy_chosen.scalar_type(), "dpo_loss_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pc = static_cast<const scalar_t*>(p.policy_chosen);
    const scalar_t* pr = static_cast<const scalar_t*>(p.policy_rejected);
    const scalar_t* rc = static_cast<const scalar_t*>(p.ref_chosen);
    const scalar_t* rr = static_cast<const scalar_t*>(p.ref_rejected);
    acc* out_loss = static_cast<acc*>(p.losses);
    acc* out_chosen = static_cast<acc*>(p.chosen_rewards);
    acc* out_rejected = static_cast<acc*>(p.rejected_rewards);
    acc* out_dlogits = static_cast<acc*>(p.dlogits);
    rlk::cpu::parallel_for(0, p.B, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const PreferencePair<acc> pair =
            preference_pair<acc>(p.kind, acc(p.beta), acc(p.label_smoothing), cast<acc>(pc[b]), cast<acc>(pr[b]),
                                 cast<acc>(rc[b]), cast<acc>(rr[b]));
        out_loss[b] = pair.loss;
        out_dlogits[b] = pair.dlogits;
        out_chosen[b] = pair.chosen_reward;
        out_rejected[b] = pair.rejected_reward;
      }
    });
  });
  return out.tuple();
}

// A row's sequence log-prob: its sum, or with average its mean (0 without valid tokens).
template <typename acc>
inline acc row_value(double total, int64_t count, bool average) {
  return acc(average ? (count > 0 ? total / double(count) : 0.0) : total);
}

// A gradient row: `value` on valid tokens, 0 elsewhere.
template <typename scalar_t>
inline void fill_row(scalar_t* row, const uint8_t* mask, int64_t T, scalar_t value) {
  if (mask == nullptr) {
    std::fill(row, row + T, value);
  } else {
    const scalar_t zero = static_cast<scalar_t>(0);
    for (int64_t t = 0; t < T; ++t) row[t] = mask[t] ? value : zero;
  }
}

std::tuple<at::Tensor, at::Tensor> sequence_logprobs_cpu(const at::Tensor& token_logprobs,
                                                         const c10::optional<at::Tensor>& mask, bool average) {
  at::Tensor sums, counts;
  const SequenceLogprobsParams p = sequence_logprobs_args(token_logprobs, mask, average, sums, counts);
  const int64_t B = p.B, T = p.T;
  const uint8_t* mask_p = p.mask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, token_logprobs.scalar_type(), "sequence_logprobs_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = static_cast<const scalar_t*>(p.token_logprobs);
    acc* out = static_cast<acc*>(p.sums);
    acc* out_counts = static_cast<acc*>(p.counts);
    rlk::cpu::parallel_for(0, B, cpu::row_grain(T), [&](int64_t begin, int64_t end) {
      alignas(64) acc staging[cpu::kChunk];
      for (int64_t b = begin; b < end; ++b) {
        int64_t count = 0;
        const double total = cpu::row_sum<acc>(x + b * T, mask_p == nullptr ? nullptr : mask_p + b * T, T, staging, &count);
        out_counts[b] = acc(count);
        out[b] = row_value<acc>(total, count, p.average);
      }
    });
  });
  return {sums, counts};
}

// d sequence_logprobs / d token_logprobs: grad[b] (over the row's count with
// average) on valid tokens, 0 elsewhere, in the input's dtype.
at::Tensor sequence_logprobs_backward_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& mask,
                                         const at::Tensor& num_tokens, bool average, int64_t T,
                                         at::ScalarType dtype) {
  at::Tensor out;
  const SequenceLogprobsParams p = sequence_logprobs_backward_args(grad, mask, num_tokens, average, T, dtype, out);
  const int64_t B = p.B;
  const uint8_t* mask_p = p.mask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sequence_logprobs_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* g = static_cast<const acc*>(p.grad);
    const acc* n = static_cast<const acc*>(p.num_tokens);
    scalar_t* o = static_cast<scalar_t*>(p.grad_tokens);
    rlk::cpu::parallel_for(0, B, cpu::row_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc per_row = p.average ? (n[b] > acc(0) ? g[b] / n[b] : acc(0)) : g[b];
        fill_row(o + b * T, mask_p == nullptr ? nullptr : mask_p + b * T, T, static_cast<scalar_t>(per_row));
      }
    });
  });
  return out;
}

// The whole DPO step's forward in one pass over the token tensors: the masked sums (or
// means) of every row of policy and reference, row after row in memory order, then per
// pair the loss, rewards and the per-row gradient coefficients.  The threads split the
// rows by the same work rule as sequence_logprobs (two rows of T tokens a row).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_sequence_loss_cpu(
    const at::Tensor& policy_logprobs, const at::Tensor& ref_logprobs, const c10::optional<at::Tensor>& mask,
    double beta, c10::string_view kind, double label_smoothing, bool average) {
  PreferenceOutputs out;
  const DpoSequenceParams p = dpo_sequence_loss_args(policy_logprobs, ref_logprobs, mask, beta, kind,
                                                     label_smoothing, average, out);
  const int64_t B = p.B, T = p.T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, policy_logprobs.scalar_type(), "dpo_sequence_loss_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* policy = static_cast<const scalar_t*>(p.policy_logprobs);
    const scalar_t* ref = static_cast<const scalar_t*>(p.ref_logprobs);
    // Per row: the policy's value, the reference's, the count of valid tokens.
    std::vector<acc> rows(static_cast<size_t>(2 * B) * 3);
    rlk::cpu::parallel_for(0, 2 * B, cpu::row_grain(2 * T), [&](int64_t begin, int64_t end) {
      alignas(64) acc staging[cpu::kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const int64_t at = r * T;
        const uint8_t* m = p.mask == nullptr ? nullptr : p.mask + at;
        int64_t count = 0, ref_count = 0;  // the same mask: the same count
        const double policy_total = cpu::row_sum<acc>(policy + at, m, T, staging, &count);
        const double ref_total = cpu::row_sum<acc>(ref + at, m, T, staging, &ref_count);
        rows[3 * r] = row_value<acc>(policy_total, count, p.average);
        rows[3 * r + 1] = row_value<acc>(ref_total, count, p.average);
        rows[3 * r + 2] = acc(count);
      }
    });
    acc* out_loss = static_cast<acc*>(p.losses);
    acc* out_chosen = static_cast<acc*>(p.chosen_rewards);
    acc* out_rejected = static_cast<acc*>(p.rejected_rewards);
    acc* out_coef = static_cast<acc*>(p.coef);
    for (int64_t b = 0; b < B; ++b) {
      const acc* chosen = rows.data() + 3 * b;
      const acc* rejected = rows.data() + 3 * (B + b);
      const PreferencePair<acc> pair = preference_pair<acc>(p.kind, acc(p.beta), acc(p.label_smoothing), chosen[0],
                                                            rejected[0], chosen[1], rejected[1]);
      out_loss[b] = pair.loss;
      out_chosen[b] = pair.chosen_reward;
      out_rejected[b] = pair.rejected_reward;
      out_coef[b] = sequence_coef<acc>(pair.dlogits, acc(1), p.average, chosen[2]);
      out_coef[B + b] = sequence_coef<acc>(pair.dlogits, acc(-1), p.average, rejected[2]);
    }
  });
  return out.tuple();
}

// Its backward in one pass over the gradient: scale * grad_losses[r mod B] * coef[r]
// on valid tokens, in the input's dtype.
at::Tensor dpo_sequence_loss_backward_cpu(const at::Tensor& grad_losses, const c10::optional<at::Tensor>& mask,
                                         const at::Tensor& coef, double scale, int64_t T, at::ScalarType dtype) {
  at::Tensor out;
  const DpoSequenceParams p = dpo_sequence_loss_backward_args(grad_losses, mask, coef, scale, T, dtype, out);
  const int64_t B = p.B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dpo_sequence_loss_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* g = static_cast<const acc*>(p.grad_losses);
    const acc* c = static_cast<const acc*>(p.coef);
    scalar_t* o = static_cast<scalar_t*>(p.grad_tokens);
    rlk::cpu::parallel_for(0, 2 * B, cpu::row_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc value = acc(p.scale) * g[(r < B ? r : r - B) * p.grad_stride] * c[r];
        fill_row(o + r * T, p.mask == nullptr ? nullptr : p.mask + r * T, T, static_cast<scalar_t>(value));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("dpo_sequence_loss", &rlk::dpo_sequence_loss_cpu);
  m.impl("dpo_sequence_loss_backward", &rlk::dpo_sequence_loss_backward_cpu);
  m.impl("sequence_logprobs_backward", &rlk::sequence_logprobs_backward_cpu);
  m.impl("dpo_loss", &rlk::dpo_loss_cpu);
  m.impl("sequence_logprobs", &rlk::sequence_logprobs_cpu);
}
