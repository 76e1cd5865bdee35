// The (optionally clipped) value loss on the CPU, in the chunked pass that
// cpu/policy_loss.cpp describes: one pass writes the per-token gradient and
// accumulates each row's loss sum, token count and clip count; a short serial
// step over rows applies the aggregation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "parallel.h"
#include "../args/value_loss.h"
#include "../core/value_loss.h"
#include "token_loss.h"

namespace rlk {
namespace {

// chunked rows, staging and reductions (simd_loops.h), the chunk scratch (token_loss.h)
using namespace cpu;

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
void value_rows(const ValueLossParams& p, double* rows) {
  using acc = acc_t<scalar_t>;
  const int64_t B = p.rows.B, T = p.rows.T;
  const scalar_t* values = static_cast<const scalar_t*>(p.values);
  const scalar_t* old_values = static_cast<const scalar_t*>(p.old_values);
  const scalar_t* returns = static_cast<const scalar_t*>(p.returns);
  const uint8_t* mask = p.rows.mask;
  acc* grad = static_cast<acc*>(p.rows.grad);
  const acc clip = kClip ? acc(p.clip) : acc(0);
  rlk::cpu::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
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
  TokenLossOutputs out;
  const ValueLossParams p = value_loss_args(values, old_values, returns, mask, coefficients, agg, need_grad, out);
  std::vector<double> rows(size_t(p.rows.B) * kValueSlots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "value_loss_cpu", [&] {
    if (std::isfinite(p.clip)) value_rows<true, scalar_t>(p, rows.data());
    else value_rows<false, scalar_t>(p, rows.data());
    finalize_rows<acc_t<scalar_t>>(rows.data(), kValueSlots, -1, p.rows);
  });
  return out.tuple();
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("value_loss", &rlk::value_loss_cpu);
}
