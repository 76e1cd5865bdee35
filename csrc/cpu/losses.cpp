// Token-level losses on the CPU: the clipped policy surrogate (PPO/GRPO) and
// the clipped value loss.  One pass over the inputs writes the per-token
// gradient and accumulates each row's loss sum, token count and statistics;
// a short serial step over rows applies the aggregation.
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
#include <type_traits>
#include <vector>

#include "../core/loss_agg.h"
#include "../core/policy_loss.h"
#include "../core/value_loss.h"
#include "../args/losses.h"
#include "../torch_common.h"
#include "simd_loops.h"

namespace rlk {
namespace {

using cpu::all_valid;
using cpu::kChunk;
using cpu::lane_sum;
using cpu::max_nonnegative;
using cpu::prefetch_ahead;
using cpu::row_grain;
using cpu::staged;

// Per-token values of one chunk, kept in L1 between the arithmetic pass and
// the reductions.
template <typename acc, int kArrays>
struct ChunkScratch {
  alignas(64) acc values[kArrays][kChunk];
  alignas(64) int32_t flags[kChunk];
  alignas(64) acc grad[kChunk];  // the gradient goes here when nobody wants it
};

// Valid tokens of a chunk (an integer sum over the mask bytes vectorises).
RLK_FORCE_INLINE int64_t count_valid(const uint8_t* __restrict__ valid, int64_t n) {
  int32_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += valid[i];
  return count;
}

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
                                 int64_t n, const PolicyParams<acc> params, acc* __restrict__ grad,
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

template <typename scalar_t>
struct PolicyInputs {
  const scalar_t* logprobs;
  const scalar_t* old_logprobs;
  const scalar_t* advantages;
  bool advantages_per_row;
  const scalar_t* weights;       // may be null
  const scalar_t* ref_logprobs;  // may be null
  const uint8_t* mask;           // may be null
};

template <int kKL, typename scalar_t>
void policy_rows(const PolicyInputs<scalar_t>& in, int64_t B, int64_t T,
                 const PolicyParams<acc_t<scalar_t>>& params, acc_t<scalar_t>* grad, double* rows) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    alignas(64) acc lp_buf[kChunk], old_buf[kChunk], adv_buf[kChunk], w_buf[kChunk], ref_buf[kChunk];
    alignas(64) acc ones[kChunk];
    ChunkScratch<acc, kPolicyArrays> scratch;
    std::fill(ones, ones + kChunk, acc(1));
    for (int64_t b = begin; b < end; ++b) {
      double* partial = rows + b * kPolicySlots;
      std::fill(partial, partial + kPolicySlots, 0.0);
      const int64_t o = b * T;
      if (in.advantages_per_row) std::fill(adv_buf, adv_buf + kChunk, cast<acc>(in.advantages[b]));
      for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const int64_t n = std::min(kChunk, T - t0);
        const int64_t at = o + t0;
        prefetch_ahead(in.logprobs + at, n);
        prefetch_ahead(in.old_logprobs + at, n);
        if (!in.advantages_per_row) prefetch_ahead(in.advantages + at, n);
        if (in.weights) prefetch_ahead(in.weights + at, n);
        if (kKL != 0) prefetch_ahead(in.ref_logprobs + at, n);
        const acc* lp = staged<acc>(in.logprobs + at, n, lp_buf);
        const acc* old = staged<acc>(in.old_logprobs + at, n, old_buf);
        const acc* adv = in.advantages_per_row ? adv_buf : staged<acc>(in.advantages + at, n, adv_buf);
        const acc* w = in.weights ? staged<acc>(in.weights + at, n, w_buf) : ones;
        const acc* ref = kKL != 0 ? staged<acc>(in.ref_logprobs + at, n, ref_buf) : lp;
        const uint8_t* valid = in.mask ? in.mask + at : all_valid();
        policy_chunk<kKL, acc>(lp, old, adv, w, ref, valid, n, params, grad ? grad + at : scratch.grad,
                               scratch, partial);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& ref_logprobs, c10::ArrayRef<double> coefficients, c10::string_view kl,
    c10::string_view agg, bool need_grad) {
  const PolicyCoefficients c = policy_coefficients(coefficients);
  const PolicyArgs args = check_policy_loss(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, kl, agg);
  const int64_t B = args.rows.B, T = args.rows.T;
  const bool adv_per_row = args.advantages_per_row;
  const KLKind kind = args.kl;
  const uint8_t* mask_p = args.rows.mask;
  const Agg mode = args.rows.agg;
  TokenLossOutputs out = token_loss_outputs(logprobs, kPolicyStats, need_grad);
  std::vector<double> rows(size_t(B) * kPolicySlots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "policy_loss_cpu", [&] {
    using acc = acc_t<scalar_t>;
    PolicyParams<acc> params;
    params.ratio_low = acc(1.0 - c.clip_low);
    params.ratio_high = acc(1.0 + c.clip_high);
    params.dual_clip = acc(c.dual_clip);
    params.log_ratio_clamp = acc(c.log_ratio_clamp);
    params.kl_coef = acc(c.kl_coef);
    PolicyInputs<scalar_t> in{logprobs.data_ptr<scalar_t>(), old_logprobs.data_ptr<scalar_t>(),
                              advantages.data_ptr<scalar_t>(), adv_per_row,
                              weights.has_value() ? weights->data_ptr<scalar_t>() : nullptr,
                              ref_logprobs.has_value() ? ref_logprobs->data_ptr<scalar_t>() : nullptr, mask_p};
    acc* grad = need_grad ? out.grad.data_ptr<acc>() : nullptr;
    switch (kind) {
      case KLKind::none: policy_rows<0>(in, B, T, params, grad, rows.data()); break;
      case KLKind::k1: policy_rows<1>(in, B, T, params, grad, rows.data()); break;
      case KLKind::k2: policy_rows<2>(in, B, T, params, grad, rows.data()); break;
      case KLKind::k3: policy_rows<3>(in, B, T, params, grad, rows.data()); break;
    }
    finalize_rows<acc>(rows.data(), B, kPolicySlots, kPolicyRatioMax, mode, c.num_tokens, c.num_seqs,
                       c.norm_length, T, out.row_scale.data_ptr<acc>(),
                       out.loss.data_ptr<acc>(), out.stats.data_ptr<acc>());
  });
  return {out.loss, out.stats, out.grad, out.row_scale};
}

// ---- value loss -------------------------------------------------------------------------------

// Masked tokens enter value_token as value = old = return = 0: loss 0,
// gradient 0, not clipped.
enum ValueArray { kArrValueLoss, kArrValueClipped, kValueArrays };

template <bool kClip, typename acc>
RLK_CPU_CLONES void value_chunk(const acc* __restrict__ values, const acc* __restrict__ old_values,
                                const acc* __restrict__ returns, const uint8_t* __restrict__ valid, int64_t n,
                                const acc clip, acc* __restrict__ grad, ChunkScratch<acc, kValueArrays>& scratch,
                                double* partial) {
  acc* __restrict__ loss = scratch.values[kArrValueLoss];
  int32_t* __restrict__ clipped = scratch.flags;
  for (int64_t i = 0; i < n; ++i) {
    const bool v = valid[i] != 0;
    const ValueToken<acc> tok = value_token<kClip, acc>(
        keep_if(v, values[i]), kClip ? keep_if(v, old_values[i]) : acc(0), keep_if(v, returns[i]), clip);
    grad[i] = tok.grad;
    loss[i] = tok.loss;
    clipped[i] = int32_t(tok.clipped);
  }
  partial[kSlotLoss] += lane_sum(loss, n);
  partial[kSlotTokens] += double(count_valid(valid, n));
  int32_t clipped_count = 0;
  for (int64_t i = 0; i < n; ++i) clipped_count += clipped[i];
  partial[kValueClipped] += double(clipped_count);
}

template <bool kClip, typename scalar_t>
void value_rows(const scalar_t* values, const scalar_t* old_values, const scalar_t* returns,
                const uint8_t* mask, int64_t B, int64_t T, acc_t<scalar_t> clip, acc_t<scalar_t>* grad,
                double* rows) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
    alignas(64) acc value_buf[kChunk], old_buf[kChunk], ret_buf[kChunk];
    ChunkScratch<acc, kValueArrays> scratch;
    for (int64_t b = begin; b < end; ++b) {
      double* partial = rows + b * kValueSlots;
      std::fill(partial, partial + kValueSlots, 0.0);
      for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const int64_t n = std::min(kChunk, T - t0);
        const int64_t at = b * T + t0;
        prefetch_ahead(values + at, n);
        prefetch_ahead(returns + at, n);
        if (kClip) prefetch_ahead(old_values + at, n);
        const acc* v = staged<acc>(values + at, n, value_buf);
        const acc* old = kClip ? staged<acc>(old_values + at, n, old_buf) : v;
        const acc* ret = staged<acc>(returns + at, n, ret_buf);
        value_chunk<kClip, acc>(v, old, ret, mask ? mask + at : all_valid(), n, clip,
                                grad ? grad + at : scratch.grad, scratch, partial);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const c10::optional<at::Tensor>& mask, c10::ArrayRef<double> coefficients, c10::string_view agg,
    bool need_grad) {
  const ValueCoefficients c = value_coefficients(coefficients);
  const TokenLossArgs args = check_value_loss(values, old_values, returns, mask, agg);
  const int64_t B = args.B, T = args.T;
  const uint8_t* mask_p = args.mask;
  const Agg mode = args.agg;
  TokenLossOutputs out = token_loss_outputs(values, kValueStats, need_grad);
  std::vector<double> rows(size_t(B) * kValueSlots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "value_loss_cpu", [&] {
    using acc = acc_t<scalar_t>;
    acc* grad = need_grad ? out.grad.data_ptr<acc>() : nullptr;
    const scalar_t* v = values.data_ptr<scalar_t>();
    const scalar_t* old = old_values.data_ptr<scalar_t>();
    const scalar_t* ret = returns.data_ptr<scalar_t>();
    if (std::isfinite(c.clip)) {
      value_rows<true>(v, old, ret, mask_p, B, T, acc(c.clip), grad, rows.data());
    } else {
      value_rows<false>(v, old, ret, mask_p, B, T, acc(0), grad, rows.data());
    }
    finalize_rows<acc>(rows.data(), B, kValueSlots, -1, mode, c.num_tokens, c.num_seqs, c.norm_length, T,
                       out.row_scale.data_ptr<acc>(),
                       out.loss.data_ptr<acc>(), out.stats.data_ptr<acc>());
  });
  return {out.loss, out.stats, out.grad, out.row_scale};
}

// ---- backward: per-row scaling of the saved per-token gradient ----------------------------------

template <typename out_t, typename acc>
RLK_CPU_CLONES void scale_row(const acc* __restrict__ grad, acc scale, int64_t n, out_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(grad[i] * scale);
}

at::Tensor scale_rows_cpu(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& grad_loss,
                          at::ScalarType dtype) {
  at::Tensor out = scale_rows_output(grad, row_scale, grad_loss, dtype);
  const int64_t B = grad.size(0), T = grad.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_rows_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc g = grad_loss.to(grad.scalar_type()).item<acc>();
    const acc* in = grad.data_ptr<acc>();
    const acc* scale = row_scale.data_ptr<acc>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) scale_row<scalar_t, acc>(in + b * T, g * scale[b], T, o + b * T);
    });
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("policy_loss", &rlk::policy_loss_cpu);
  m.impl("value_loss", &rlk::value_loss_cpu);
  m.impl("scale_rows", &rlk::scale_rows_cpu);
}
