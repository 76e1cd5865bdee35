// Preference losses on the CPU: dpo_loss over per-pair sequence log-probs,
// and sequence_logprobs, the masked per-row sums (or means) that feed it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "parallel.h"
#include "../core/preference.h"
#include "../args/preference.h"
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

// lane_sum of x[i] where valid[i] (exact zeros elsewhere: NaN in a masked slot stays
// out), and the count of valid entries, in one pass compiled per ISA level.
template <typename acc>
RLK_CPU_CLONES double masked_lane_sum(const acc* __restrict__ x, const uint8_t* __restrict__ valid, int64_t n,
                                      int64_t* __restrict__ count) {
  int64_t c = 0;
  const double sum = cpu::lane_sum_by<acc>(n, [&](int64_t i) {
    c += valid[i] != 0;
    return keep_if(valid[i] != 0, x[i]);
  });
  *count += c;
  return sum;
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
        double total = 0;
        int64_t count = 0;
        for (int64_t t0 = 0; t0 < T; t0 += cpu::kChunk) {
          const int64_t n = std::min(cpu::kChunk, T - t0);
          const int64_t at = b * T + t0;
          cpu::prefetch_ahead(x + at, n);
          const acc* values = cpu::staged<acc>(x + at, n, staging);
          if (mask_p != nullptr) {
            total += masked_lane_sum(values, mask_p + at, n, &count);
          } else {
            count += n;
            total += cpu::lane_sum(values, n);
          }
        }
        out_counts[b] = acc(count);
        out[b] = acc(p.average ? (count > 0 ? total / double(count) : 0.0) : total);
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
        const scalar_t value = static_cast<scalar_t>(per_row), zero = static_cast<scalar_t>(0);
        scalar_t* row = o + b * T;
        if (mask_p == nullptr) {
          std::fill(row, row + T, value);
        } else {
          const uint8_t* m = mask_p + b * T;
          for (int64_t t = 0; t < T; ++t) row[t] = m[t] ? value : zero;
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("sequence_logprobs_backward", &rlk::sequence_logprobs_backward_cpu);
  m.impl("dpo_loss", &rlk::dpo_loss_cpu);
  m.impl("sequence_logprobs", &rlk::sequence_logprobs_cpu);
}
