// How a [B, T] matrix of per-token losses becomes one scalar, shared by every
// token-level loss (policy and value) on every compiled backend.
//
// With m the mask, L the per-token loss, n_t the number of valid tokens (or
// the caller's global num_tokens), n_s the number of rows with at least one
// valid token (or the caller's num_seqs) and T_norm the row length (or
// norm_length):
//   token-mean               sum(m L) / n_t
//   token-sum                sum(m L)
//   seq-mean-token-sum       sum_s(sum_t m L) / n_s
//   seq-mean-token-mean      sum_s(sum_t m L / sum_t m) / n_s
//   seq-mean-token-sum-norm  sum_s(sum_t m L) / (n_s T_norm)
// Every mode is a weighted sum of row sums, loss = sum_b scale_b S_b, so the
// gradient of token (b, t) is scale_b m dL/dx: kernels accumulate S_b and the
// row's token count in one pass and the per-row scales come after.  A
// normaliser of 0 (nothing valid) gives scale 0, hence loss 0, not NaN.
#pragma once
#include <cstdint>

#include "common.h"

namespace rlk {

enum class Agg : int {
  token_mean = 0,
  token_sum = 1,
  seq_mean_token_sum = 2,
  seq_mean_token_mean = 3,
  seq_mean_token_sum_norm = 4,
};

// What policy_loss and value_loss share, filled by args/token_loss.h.  Inputs
// are [B, T] of `dtype`; outputs are in its accumulation type.  A normaliser
// < 0 means "count it" (norm_length: use T).
struct TokenLossParams {
  int64_t B = 0, T = 0;
  Dtype dtype = Dtype::f32;
  const uint8_t* mask = nullptr;  // may be null
  Agg agg = Agg::token_mean;
  double num_tokens = -1, num_seqs = -1, norm_length = -1;
  void* grad = nullptr;           // [B, T] per-token gradient, null unless wanted
  void* row_scale = nullptr;      // [B]
  void* loss = nullptr;           // one value
  void* stats = nullptr;          // the loss's statistics
  double* workspace = nullptr;    // CUDA: per-chunk partial sums (token_loss_workspace doubles)
};

// The arguments of scale_rows, the token losses' backward:
// out[b, t] = grad[b, t] * (grad_loss * row_scale[b]), out of `dtype`, the
// rest in its accumulation type.
struct ScaleRowsParams {
  int64_t B = 0, T = 0;
  Dtype dtype = Dtype::f32;
  const void* grad = nullptr;
  const void* row_scale = nullptr;
  const void* grad_loss = nullptr;  // one value
  void* out = nullptr;
};

// Layout of the per-row (or per-chunk) partial sums every token loss keeps:
// slot 0 the row's loss sum, slot 1 its valid-token count, then the loss's
// own statistics.
constexpr int kSlotLoss = 0;
constexpr int kSlotTokens = 1;
constexpr int kFirstStatSlot = 2;

// The normalisers of one batch.  A caller-given value (>= 0) wins over the
// counted one, which is what makes gradient accumulation and data parallelism
// give the gradient of the whole batch.
struct AggNorm {
  double num_tokens;
  double num_seqs;
  double norm_length;
};

RLK_INLINE AggNorm agg_norm(double given_tokens, double given_seqs, double given_norm_length,
                            double counted_tokens, double counted_seqs, int64_t row_length) {
  AggNorm n;
  n.num_tokens = given_tokens >= 0 ? given_tokens : counted_tokens;
  n.num_seqs = given_seqs >= 0 ? given_seqs : counted_seqs;
  n.norm_length = given_norm_length >= 0 ? given_norm_length : double(row_length);
  return n;
}

RLK_INLINE double inverse_or_zero(double x) { return x > 0 ? 1.0 / x : 0.0; }

// d loss / d S_b for a row holding `row_tokens` valid tokens.
RLK_INLINE double agg_row_scale(Agg agg, double row_tokens, const AggNorm& n) {
  switch (agg) {
    case Agg::token_mean:
      return inverse_or_zero(n.num_tokens);
    case Agg::token_sum:
      return 1.0;
    case Agg::seq_mean_token_sum:
      return inverse_or_zero(n.num_seqs);
    case Agg::seq_mean_token_mean:
      return row_tokens > 0 ? inverse_or_zero(row_tokens * n.num_seqs) : 0.0;
    case Agg::seq_mean_token_sum_norm:
      return inverse_or_zero(n.num_seqs * n.norm_length);
  }
  return 0.0;
}

// Whether counting the batch's sequences / tokens is needed at all.
RLK_INLINE bool agg_uses_seqs(Agg agg) {
  return agg == Agg::seq_mean_token_sum || agg == Agg::seq_mean_token_mean ||
         agg == Agg::seq_mean_token_sum_norm;
}

}  // namespace rlk

namespace rlk {

// Turns per-row partial sums (rows[b * K + slot], slot 0 the row's loss sum,
// slot 1 its token count, slots 2.. statistics summed over valid tokens, the
// slot `max_slot` a running maximum instead, of the values that slot max_slot - 1
// sums) into the loss, the per-row
// gradient scales and the statistics: means over the batch's valid tokens
// (the maximum for max_slot; 0 when nothing is valid) followed by the
// number of valid tokens.  Host code; the CUDA finalise kernel applies the
// same agg_norm / agg_row_scale in parallel.
template <typename out_t>
inline void finalize_rows(const double* rows, int64_t B, int K, int max_slot, Agg agg,
                          double given_tokens, double given_seqs, double given_norm_length,
                          int64_t row_length, out_t* row_scale, out_t* loss, out_t* stats) {
  double tokens = 0, seqs = 0;
  for (int64_t b = 0; b < B; ++b) {
    tokens += rows[b * K + kSlotTokens];
    seqs += rows[b * K + kSlotTokens] > 0 ? 1.0 : 0.0;
  }
  const AggNorm norm = agg_norm(given_tokens, given_seqs, given_norm_length, tokens, seqs, row_length);
  double total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double scale = agg_row_scale(agg, rows[b * K + kSlotTokens], norm);
    row_scale[b] = out_t(scale);
    total += scale * rows[b * K + kSlotLoss];
  }
  *loss = out_t(total);
  double previous = 0;  // the sum of slot k - 1 over the rows
  for (int k = kFirstStatSlot; k < K; ++k) {
    double value = 0;
    for (int64_t b = 0; b < B; ++b) {
      const double x = rows[b * K + k];
      value = k == max_slot ? (x > value ? x : value) : value + x;
    }
    // A running maximum skips NaN; the slot before max_slot sums the same values, so a
    // NaN there (some value is NaN) makes the maximum NaN too, as torch's max would.
    if (k == max_slot && previous != previous) value = previous;
    stats[k - kFirstStatSlot] = out_t(k == max_slot ? value : (tokens > 0 ? value / tokens : 0.0));
    previous = value;
  }
  stats[K - kFirstStatSlot] = out_t(tokens);
}

// finalize_rows for a token loss's params (outputs in out_t, the accumulation type).
template <typename out_t>
inline void finalize_rows(const double* rows, int K, int max_slot, const TokenLossParams& p) {
  finalize_rows<out_t>(rows, p.B, K, max_slot, p.agg, p.num_tokens, p.num_seqs, p.norm_length, p.T,
                       static_cast<out_t*>(p.row_scale), static_cast<out_t*>(p.loss), static_cast<out_t*>(p.stats));
}

namespace cuda {
// The doubles of TokenLossParams::workspace a token loss needs on the GPU
// (slots: kPolicySlots or kValueSlots).
int64_t token_loss_workspace(int64_t B, int64_t T, int slots);
}  // namespace cuda

// The CUDA launchers (token_loss.cu).
RLK_CUDA_LAUNCHER(launch_scale_rows, ScaleRowsParams)

}  // namespace rlk
