// Preference losses on the CPU: dpo_loss over per-pair sequence log-probs,
// and sequence_logprobs, the masked per-row sums (or means) that feed it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "../core/preference.h"
#include "../args/losses.h"
#include "../torch_common.h"
#include "simd_loops.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_cpu(
    const at::Tensor& policy_chosen, const at::Tensor& policy_rejected, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, double beta, c10::string_view kind, double label_smoothing) {
  const PreferenceKind k = check_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kind);
  const int64_t B = policy_chosen.size(0);
  const auto opts = policy_chosen.options().dtype(out_dtype_for(policy_chosen.scalar_type()));
  auto losses = at::empty({B}, opts), chosen = at::empty({B}, opts), rejected = at::empty({B}, opts);
  auto dlogits = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, policy_chosen.scalar_type(), "dpo_loss_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pc = policy_chosen.data_ptr<scalar_t>();
    const scalar_t* pr = policy_rejected.data_ptr<scalar_t>();
    const scalar_t* rc = ref_chosen.data_ptr<scalar_t>();
    const scalar_t* rr = ref_rejected.data_ptr<scalar_t>();
    acc* out_loss = losses.data_ptr<acc>();
    acc* out_chosen = chosen.data_ptr<acc>();
    acc* out_rejected = rejected.data_ptr<acc>();
    acc* out_dlogits = dlogits.data_ptr<acc>();
    at::parallel_for(0, B, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const PreferencePair<acc> pair = preference_pair<acc>(k, acc(beta), acc(label_smoothing), cast<acc>(pc[b]),
                                                              cast<acc>(pr[b]), cast<acc>(rc[b]), cast<acc>(rr[b]));
        out_loss[b] = pair.loss;
        out_dlogits[b] = pair.dlogits;
        out_chosen[b] = pair.chosen_reward;
        out_rejected[b] = pair.rejected_reward;
      }
    });
  });
  return {losses, chosen, rejected, dlogits};
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
  const uint8_t* mask_p = check_sequence_logprobs(token_logprobs, mask);
  const int64_t B = token_logprobs.size(0), T = token_logprobs.size(1);
  const auto opts = token_logprobs.options().dtype(out_dtype_for(token_logprobs.scalar_type()));
  auto sums = at::empty({B}, opts), counts = at::empty({B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, token_logprobs.scalar_type(), "sequence_logprobs_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = token_logprobs.data_ptr<scalar_t>();
    acc* out = sums.data_ptr<acc>();
    acc* out_counts = counts.data_ptr<acc>();
    at::parallel_for(0, B, cpu::row_grain(T), [&](int64_t begin, int64_t end) {
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
        out[b] = acc(average ? (count > 0 ? total / double(count) : 0.0) : total);
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
  const uint8_t* mask_p = check_sequence_logprobs_backward(grad, mask, num_tokens, T, dtype);
  const int64_t B = grad.size(0);
  auto out = at::empty({B, T}, grad.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sequence_logprobs_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* g = grad.data_ptr<acc>();
    const acc* n = num_tokens.data_ptr<acc>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, cpu::row_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc per_row = average ? (n[b] > acc(0) ? g[b] / n[b] : acc(0)) : g[b];
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
