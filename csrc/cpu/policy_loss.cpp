// The clipped policy surrogate (PPO/GRPO) on the CPU.  One pass over the
// inputs writes the per-token gradient and accumulates each row's loss sum,
// token count and statistics; a short serial step over rows applies the
// aggregation.
//
// Rows are processed in chunks of kChunk tokens.  Inputs that are not already
// in the accumulation type (16-bit floats, per-row advantages) are staged
// into small buffers, so the arithmetic loop is instantiated per accumulation
// type only.  Each chunk is an element-wise pass (branch-free, so the
// compiler vectorises it; setup.py adds -fno-trapping-math for that) into
// L1-resident arrays, then reductions with kLanes independent partial sums.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "parallel.h"
#include "../args/policy_loss.h"
#include "../core/policy_loss.h"
#include "token_loss.h"

namespace rlk {
namespace {

// chunked rows, staging and reductions (simd_loops.h), the chunk scratch (token_loss.h)
using namespace cpu;

// Sum of flags[0, n) split into its three 10-bit fields (n <= kChunk < 1024).
RLK_FORCE_INLINE void add_flag_counts(const int32_t* __restrict__ flags, int64_t n, double* upper, double* lower,
                                      double* dual) {
  static_assert(kChunk < 1024, "a 10-bit field counts one chunk");
  int32_t packed = 0;
  for (int64_t i = 0; i < n; ++i) packed += flags[i];
  *upper += double(packed & 1023);
  *lower += double((packed >> 10) & 1023);
  *dual += double(packed >> 20);
}

// ---- policy surrogate -------------------------------------------------------------------------

// Masked tokens enter policy_token as logprob = old = advantage = weight =
// ref = 0, which gives ratio 1 (exp(0) is exact) and exactly 0 for the loss,
// the flags, k1, k3 and the KL terms; only the ratio, the token count and
// k1's constant KL slope need an explicit select.
enum PolicyArray { kArrLoss, kArrK1, kArrK3, kArrRatio, kArrKL, kPolicyArrays };

template <int kKL, typename acc>
RLK_CPU_CLONES void policy_chunk(const acc* __restrict__ logprobs, const acc* __restrict__ old_logprobs,
                                 const acc* __restrict__ advantages, const acc* __restrict__ weights,
                                 const acc* __restrict__ ref_logprobs, const uint8_t* __restrict__ valid,
                                 int64_t n, const PolicyLossParams params, acc* __restrict__ grad,
                                 ChunkScratch<acc, kPolicyArrays>& scratch, double* partial) {
  acc* __restrict__ loss = scratch.values[kArrLoss];
  acc* __restrict__ k1 = scratch.values[kArrK1];
  acc* __restrict__ k3 = scratch.values[kArrK3];
  acc* __restrict__ ratio = scratch.values[kArrRatio];
  acc* __restrict__ kl = scratch.values[kArrKL];
  int32_t* __restrict__ flags = scratch.flags;
  for (int64_t i = 0; i < n; ++i) {
    // Select, never multiply: NaN or inf in masked slots must not reach
    // the sums or the gradient.
    const bool v = valid[i] != 0;
    const PolicyToken<acc> tok = policy_token<kKL, acc>(
        keep_if(v, logprobs[i]), keep_if(v, old_logprobs[i]), keep_if(v, advantages[i]),
        keep_if(v, weights[i]), kKL != 0 ? keep_if(v, ref_logprobs[i]) : acc(0), params);
    grad[i] = keep_if(v, tok.grad);
    loss[i] = tok.loss;
    k1[i] = tok.k1;
    k3[i] = tok.k3;
    ratio[i] = keep_if(v, tok.ratio);
    if (kKL != 0) kl[i] = tok.kl;
    flags[i] = int32_t(tok.clip_upper) | (int32_t(tok.clip_lower) << 10) | (int32_t(tok.clip_dual) << 20);
  }
  partial[kSlotLoss] += lane_sum(loss, n);
  partial[kSlotTokens] += double(count_valid(valid, n));
  add_flag_counts(flags, n, &partial[kPolicyClipUpper], &partial[kPolicyClipLower], &partial[kPolicyClipDual]);
  partial[kPolicyK1] += lane_sum(k1, n);
  partial[kPolicyK3] += lane_sum(k3, n);
  partial[kPolicyRatioSum] += lane_sum(ratio, n);
  partial[kPolicyRatioMax] = std::max(partial[kPolicyRatioMax], double(max_nonnegative(ratio, n)));
  if (kKL != 0) partial[kPolicyRefKL] += lane_sum(kl, n);
}

template <int kKL, typename scalar_t>
void policy_rows(const PolicyLossParams& p, double* rows) {
  using acc = acc_t<scalar_t>;
  const int64_t B = p.rows.B, T = p.rows.T;
  const scalar_t* logprobs = static_cast<const scalar_t*>(p.logprobs);
  const scalar_t* old_logprobs = static_cast<const scalar_t*>(p.old_logprobs);
  const scalar_t* advantages = static_cast<const scalar_t*>(p.advantages);
  const scalar_t* weights = static_cast<const scalar_t*>(p.weights);
  const scalar_t* ref_logprobs = static_cast<const scalar_t*>(p.ref_logprobs);
  const uint8_t* mask = p.rows.mask;
  acc* grad = static_cast<acc*>(p.rows.grad);
  rlk::cpu::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    alignas(64) acc lp_buf[kChunk], old_buf[kChunk], adv_buf[kChunk], w_buf[kChunk], ref_buf[kChunk];
    alignas(64) acc ones[kChunk];
    ChunkScratch<acc, kPolicyArrays> scratch;
    std::fill(ones, ones + kChunk, acc(1));
    for (int64_t b = begin; b < end; ++b) {
      double* partial = rows + b * kPolicySlots;
      std::fill(partial, partial + kPolicySlots, 0.0);
      const int64_t o = b * T;
      if (p.advantages_per_row) std::fill(adv_buf, adv_buf + kChunk, cast<acc>(advantages[b]));
      for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const int64_t n = std::min(kChunk, T - t0);
        const int64_t at = o + t0;
        prefetch_ahead(logprobs + at, n);
        prefetch_ahead(old_logprobs + at, n);
        if (!p.advantages_per_row) prefetch_ahead(advantages + at, n);
        if (weights) prefetch_ahead(weights + at, n);
        if (kKL != 0) prefetch_ahead(ref_logprobs + at, n);
        const acc* lp = staged<acc>(logprobs + at, n, lp_buf);
        const acc* old = staged<acc>(old_logprobs + at, n, old_buf);
        const acc* adv = p.advantages_per_row ? adv_buf : staged<acc>(advantages + at, n, adv_buf);
        const acc* w = weights ? staged<acc>(weights + at, n, w_buf) : ones;
        const acc* ref = kKL != 0 ? staged<acc>(ref_logprobs + at, n, ref_buf) : lp;
        const uint8_t* valid = mask ? mask + at : all_valid();
        policy_chunk<kKL, acc>(lp, old, adv, w, ref, valid, n, p, grad ? grad + at : scratch.grad, scratch, partial);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& ref_logprobs, c10::ArrayRef<double> coefficients, c10::string_view kl,
    c10::string_view agg, bool need_grad) {
  TokenLossOutputs out;
  const PolicyLossParams p = policy_loss_args(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs,
                                              coefficients, kl, agg, need_grad, out);
  std::vector<double> rows(size_t(p.rows.B) * kPolicySlots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "policy_loss_cpu", [&] {
    switch (p.kl) {
      case KLKind::none: policy_rows<0, scalar_t>(p, rows.data()); break;
      case KLKind::k1: policy_rows<1, scalar_t>(p, rows.data()); break;
      case KLKind::k2: policy_rows<2, scalar_t>(p, rows.data()); break;
      case KLKind::k3: policy_rows<3, scalar_t>(p, rows.data()); break;
    }
    finalize_rows<acc_t<scalar_t>>(rows.data(), kPolicySlots, kPolicyRatioMax, p.rows);
  });
  return out.tuple();
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("policy_loss", &rlk::policy_loss_cpu);
}
