// The body of rlkernels::linear_policy_loss (rlkernels.linear_ppo_loss): one sweep over
// pieces of the [B, T] token grid.  For each piece: the lm-head logits into one reused
// buffer (every matmul on a multiple of kGemmRows rows, tiles.h's RowChunk, as in
// linear_logprobs, so a token's logits are the bits linear_logprobs gives it), the fused
// log-softmax row kernel (rlkernels::logprobs), the fused policy op (rlkernels::policy_loss,
// the piece's share of the loss, its statistics and d loss / d log-prob), the row kernel's
// in-place backward (the logits become d loss / d logits) and the gradient matmuls.  The
// statistics are totalled in float64 over the pieces.  Only ATen ops and dispatcher calls
// (the Triton twins of the three kernels for backend "triton"): one device-generic body,
// registered for CPU and CUDA.  Its autograd: csrc/autograd/linear_policy_loss.cpp.
//
// The pieces (how the grid is cut and each piece's share normalised) are planned here,
// the only definition; the caller says how (`pieces`, rlkernels/ops/_ppo_pieces.py):
//   "counted"        the batch's counts read on the host and given to each piece as the
//                    policy op's normalisers; rows without a valid token skipped; every
//                    token of a piece through the lm-head (masked ones with zero hidden);
//   "counted-valid"  the same, masked tokens dropped before the lm-head (a gather and
//                    scatters: worth it on large problems only);
//   "device"         no host read (CUDA outside the checked mode): unit normalisers in
//                    the op, the batch's normalisation a float64 device scale on each
//                    piece's loss and gradients (0 where a count is 0); every token and
//                    row through the lm-head (ignored ones give 0 and no gradient).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../dispatcher.h"
#include "tiles.h"

namespace rlk::lm_head {
namespace {

using Opt = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using RowForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                                                      int64_t, bool, bool);
using RowBackwardInplaceSig = void(const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, double, int64_t, int64_t);
using PolicySig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const Opt&,
    c10::ArrayRef<double>, c10::string_view, c10::string_view, bool);

// The policy op's statistics (rlkernels.reference.policy_loss.POLICY_STATS): ratio_max's
// slot; the last slot is the token count.
constexpr int64_t kRatioMaxSlot = 6;
// The coefficients' slots of the normalisers (after clip_low, clip_high, dual_clip,
// log_ratio_clamp, kl_coef; csrc/args/policy_loss.h reads the list).
constexpr size_t kTokens = 5, kSeqs = 6, kNorm = 7, kNumCoefficients = 8;

// The kernels a backend runs: the compiled ops, or their Triton twins (per_backend,
// csrc/dispatcher.h), looked up together on the backend's first use.
struct Kernels {
  c10::TypedOperatorHandle<RowForwardSig> row_forward;
  c10::TypedOperatorHandle<RowBackwardInplaceSig> row_backward_inplace;
  c10::TypedOperatorHandle<PolicySig> policy;
};

const Kernels& kernels(c10::string_view backend) {
  return per_backend(backend, [](bool twin) {
    return Kernels{op_or_twin<RowForwardSig>("rlkernels::logprobs", twin),
                   op_or_twin<RowBackwardInplaceSig>("rlkernels::logprobs_backward_inplace", twin),
                   op_or_twin<PolicySig>("rlkernels::policy_loss", twin)};
  });
}

// A piece: rows [r0, r1) x columns [c0, c1), its aggregation and coefficients, and the
// scale of its loss and gradients ("device" pieces: a float64 0-dim tensor or a number).
struct Piece {
  int64_t r0, r1, c0, c1;
  std::string agg;
  std::vector<double> coefficients;
  bool all_valid = false;     // known to have no masked token (counted pieces)
  at::Tensor scale;           // undefined: none, or see `number`
  std::optional<double> number;

  // the whole [B, T] grid (no slicing)
  bool whole(int64_t B, int64_t T) const { return r0 == 0 && r1 == B && c0 == 0 && c1 == T; }
};

// 1 / count, 0 where count is 0 (a given count is > 0, checked by the public function).
at::Tensor safe_inverse(const at::Tensor& count) {
  const at::Tensor positive = count.gt(0);
  return at::where(positive, at::where(positive, count, 1.0).reciprocal(), 0.0);
}

std::vector<Piece> counted_pieces(const at::Tensor& valid, int64_t chunk, const std::string& agg,
                                  std::vector<double> coefficients) {
  const int64_t B = valid.size(0), T = valid.size(1);
  // the row counts, read once: straight from the mask's bytes for a plain CPU tensor
  std::vector<int64_t> counts(B, 0);
  const bool direct = host_readable(valid) && valid.is_contiguous();
  if (direct) {
    const bool* v = valid.const_data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) count += v[b * T + t];
      counts[b] = count;
    }
  } else {  // (fake tensors in the checked mode land here, and raise at the read)
    const at::Tensor row_tokens = valid.sum(-1).cpu();
    for (int64_t b = 0; b < B; ++b) counts[b] = row_tokens[b].item<int64_t>();
  }
  int64_t tokens = 0, seqs = 0;
  for (int64_t count : counts) {
    tokens += count;
    seqs += count > 0;
  }
  if (coefficients[kTokens] < 0) coefficients[kTokens] = static_cast<double>(tokens);
  if (coefficients[kSeqs] < 0) coefficients[kSeqs] = static_cast<double>(seqs);
  if (coefficients[kNorm] < 0) coefficients[kNorm] = static_cast<double>(T);
  std::vector<Piece> out;
  if (T <= chunk) {
    const int64_t rows = std::max<int64_t>(1, chunk / std::max<int64_t>(T, 1));
    for (int64_t r0 = 0; r0 < B; r0 += rows) {
      const int64_t r1 = std::min(r0 + rows, B);
      int64_t valid_tokens = 0;
      for (int64_t b = r0; b < r1; ++b) valid_tokens += counts[b];
      out.push_back({r0, r1, 0, T, agg, coefficients, valid_tokens == (r1 - r0) * T});
    }
    return out;
  }
  for (int64_t b = 0; b < B; ++b) {
    if (counts[b] == 0) continue;
    std::string piece_agg = agg;
    std::vector<double> piece_coefficients = coefficients;
    if (agg == "seq-mean-token-mean") {  // a row segment: the same per-row scale through num_seqs
      piece_agg = "seq-mean-token-sum";
      piece_coefficients[kSeqs] = coefficients[kSeqs] * static_cast<double>(counts[b]);
    }
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
      out.push_back({b, b + 1, c0, std::min(c0 + chunk, T), piece_agg, piece_coefficients, counts[b] == T});
    }
  }
  return out;
}

std::vector<Piece> device_pieces(const at::Tensor& valid, int64_t chunk, const std::string& agg,
                                 const std::vector<double>& coefficients) {
  const int64_t B = valid.size(0), T = valid.size(1);
  const double given_tokens = coefficients[kTokens], given_seqs = coefficients[kSeqs],
               given_norm = coefficients[kNorm];
  const at::Tensor row_tokens = valid.sum(-1, false, at::kDouble);
  // a count: a device tensor, or the given number
  struct Count {
    at::Tensor tensor;
    double number = 0;
    at::Tensor times(const Count& other) const {  // tensor * (tensor or number)
      return other.tensor.defined() ? tensor * other.tensor : tensor * other.number;
    }
  };
  Count n_t, n_s;
  if (given_tokens < 0) n_t.tensor = row_tokens.sum(); else n_t.number = given_tokens;
  if (given_seqs < 0) n_s.tensor = row_tokens.gt(0).sum(at::kDouble); else n_s.number = given_seqs;
  const double t_norm = given_norm < 0 ? static_cast<double>(T) : given_norm;
  std::vector<double> unit(coefficients.begin(), coefficients.begin() + kTokens);
  unit.insert(unit.end(), {1.0, 1.0, 1.0});
  Piece scaled{0, 0, 0, 0, "token-sum", unit};
  const auto set_inverse = [&scaled](const Count& count) {
    if (count.tensor.defined()) scaled.scale = safe_inverse(count.tensor); else scaled.number = 1.0 / count.number;
  };
  if (agg == "token-mean") {
    set_inverse(n_t);
  } else if (agg == "seq-mean-token-sum" || agg == "seq-mean-token-mean") {
    set_inverse(n_s);
  } else if (agg == "seq-mean-token-sum-norm") {
    if (n_s.tensor.defined()) {
      scaled.scale = safe_inverse(n_s.tensor * t_norm);
    } else {
      scaled.number = 1.0 / (n_s.number * t_norm);
    }
  } else {
    TORCH_CHECK(agg == "token-sum", "linear_policy_loss: unknown agg '", agg, "'");
  }
  std::vector<Piece> out;
  if (T <= chunk) {
    // whole rows: seq-mean-token-mean with n_s = 1 counts each row's 1 / (row tokens) itself
    if (agg == "seq-mean-token-mean") scaled.agg = agg;
    const int64_t rows = std::max<int64_t>(1, chunk / std::max<int64_t>(T, 1));
    for (int64_t r0 = 0; r0 < B; r0 += rows) {
      Piece piece = scaled;
      piece.r0 = r0, piece.r1 = std::min(r0 + rows, B), piece.c1 = T;
      out.push_back(std::move(piece));
    }
    return out;
  }
  for (int64_t b = 0; b < B; ++b) {
    Piece row = scaled;
    if (agg == "seq-mean-token-mean") {  // a segment cannot count its row: 1 / (row tokens * n_s)
      row.scale = safe_inverse(Count{row_tokens[b]}.times(n_s));
      row.number.reset();
    }
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
      Piece piece = row;
      piece.r0 = b, piece.r1 = b + 1, piece.c0 = c0, piece.c1 = std::min(c0 + chunk, T);
      out.push_back(std::move(piece));
    }
  }
  return out;
}

// The shapes the pieces are cut by, checked for direct calls of the op (the row and loss
// kernels it calls check the rest).
void check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const Opt& bias,
                const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& valid,
                const Opt& weights, const Opt& ref_logprobs, c10::ArrayRef<double> coefficients, int64_t chunk,
                const c10::List<bool>& needs, c10::string_view pieces) {
  TORCH_CHECK(hidden.dim() == 3 && weight.dim() == 2 && weight.size(1) == hidden.size(2),
              "linear_policy_loss: hidden must be [B, T, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  const int64_t B = hidden.size(0), T = hidden.size(1);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "linear_policy_loss: bias must be [V]");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 2 && labels.size(0) == B && labels.size(1) == T,
              "linear_policy_loss: labels must be int64 [", B, ", ", T, "]");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == B && valid.size(1) == T,
              "linear_policy_loss: valid must be bool [", B, ", ", T, "]");
  const auto rows = [&](const char* name, const Opt& t) {
    TORCH_CHECK(!t.has_value() || (t->dim() == 2 && t->size(0) == B && t->size(1) == T), "linear_policy_loss: ",
                name, " must be [", B, ", ", T, "]");
  };
  rows("old_logprobs", old_logprobs);
  rows("weights", weights);
  rows("ref_logprobs", ref_logprobs);
  TORCH_CHECK((advantages.dim() == 1 && advantages.size(0) == B) ||
                  (advantages.dim() == 2 && advantages.size(0) == B && advantages.size(1) == T),
              "linear_policy_loss: advantages must be [", B, "] or [", B, ", ", T, "]");
  TORCH_CHECK(needs.size() == 3, "linear_policy_loss: needs holds 3 flags (hidden, weight, bias)");
  TORCH_CHECK(coefficients.size() == kNumCoefficients, "linear_policy_loss: coefficients holds ", kNumCoefficients,
              " values, got ", coefficients.size());
  TORCH_CHECK(chunk >= 0, "linear_policy_loss: chunk must be >= 0 (0: from the budget), got ", chunk);
  TORCH_CHECK(pieces == "counted" || pieces == "counted-valid" || pieces == "device",
              "linear_policy_loss: pieces must be 'counted', 'counted-valid' or 'device', got '", pieces, "'");
}

// A piece of a [B, T] (or per-sequence [B]) token tensor.
Opt cut(const Opt& t, const Piece& piece, bool whole) {
  if (!t.has_value()) return std::nullopt;
  if (whole) return t->contiguous();
  if (t->dim() == 1) return t->slice(0, piece.r0, piece.r1);
  return t->slice(0, piece.r0, piece.r1).slice(1, piece.c0, piece.c1).contiguous();
}

// rows [n, H] with the rows where `keep` [n] is false set to zero: at::where, or on plain
// contiguous CPU tensors a copy row by row (a per-call cost of the small problems: where
// with a scalar is three aten ops, ~3 us).  The zero is +0 either way.
at::Tensor zero_masked_rows(const at::Tensor& rows, const at::Tensor& keep) {
  if (!(host_readable(rows) && host_readable(keep) && rows.is_contiguous() && keep.is_contiguous() &&
        keep.scalar_type() == at::kBool && rows.dim() == 2)) {
    return at::where(keep.reshape({-1, 1}), rows, 0);
  }
  at::Tensor out = at::empty_like(rows);
  const int64_t n = rows.size(0);
  const size_t row_bytes = static_cast<size_t>(rows.size(1)) * rows.element_size();
  const bool* k = keep.const_data_ptr<bool>();
  const char* in = static_cast<const char*>(rows.const_data_ptr());
  char* o = static_cast<char*>(out.mutable_data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    if (k[i]) {
      std::memcpy(o + i * row_bytes, in + i * row_bytes, row_bytes);
    } else {
      std::memset(o + i * row_bytes, 0, row_bytes);
    }
  }
  return out;
}

at::Tensor accumulate(const at::Tensor& total, const at::Tensor& value) {
  return total.defined() ? total + value : value;
}

Outputs linear_policy_loss(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                           const Opt& bias, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                           const at::Tensor& valid, const Opt& weights, const Opt& ref_logprobs,
                           c10::ArrayRef<double> coefficients, c10::string_view kl, c10::string_view agg,
                           double entropy_coef, double temperature, int64_t ignore_index, int64_t chunk,
                           c10::string_view backend, const c10::List<bool>& needs, c10::string_view pieces) {
  check_args(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs, coefficients,
             chunk, needs, pieces);
  const Kernels& k = kernels(backend);
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2), vocab = weight.size(0);
  // the caller's chunk_size, 0 for the default budget, balanced by the tile rule (core/lm_head.h)
  chunk = chunk_rows(B * T, vocab, chunk, kChunkBytes);
  const bool needs_hidden = needs.get(0), needs_weight = needs.get(1), needs_bias = needs.get(2) && bias.has_value();
  const bool any_grad = needs_hidden || needs_weight || needs_bias;
  const bool with_entropy = entropy_coef != 0.0;
  const at::ScalarType acc = old_logprobs.scalar_type();
  const bool wide = weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16;
  const auto f64 = hidden.options().dtype(at::kDouble);
  const bool on_device = pieces == "device";
  const bool every_token = pieces != "counted-valid";
  const std::string agg_name(agg);
  const std::vector<double> coefficient_list(coefficients.begin(), coefficients.end());
  const std::vector<Piece> plan = on_device ? device_pieces(valid, chunk, agg_name, coefficient_list)
                                            : counted_pieces(valid, chunk, agg_name, coefficient_list);
  // One piece of every token writes every row of grad hidden (mm_out below): no zero fill.
  const bool writes_all_rows = every_token && B * T > 0 && plan.size() == 1 && plan[0].whole(B, T);
  at::Tensor grad_hidden = !needs_hidden    ? hidden.new_empty({0})
                           : writes_all_rows ? at::empty(hidden.sizes(), hidden.options())
                                             : at::zeros(hidden.sizes(), hidden.options());
  at::Tensor grad_weight = needs_weight ? at::Tensor() : weight.new_empty({0});  // the first piece's product, then sums
  at::Tensor grad_bias = needs_bias ? at::zeros({vocab}, weight.options().dtype(at::kFloat)) : weight.new_empty({0});
  const at::Tensor flat_hidden = hidden.reshape({B * T, H});
  const at::Tensor flat_labels = labels.reshape({-1});
  const at::Tensor flat_grad_hidden = needs_hidden ? grad_hidden.view({B * T, H}) : at::Tensor();
  const at::Tensor buffer =
      B * T > 0 ? hidden.new_empty({padded_rows(std::min(chunk, B * T)), vocab}) : at::Tensor();
  // float64 totals from the first piece on: loss, tokens, stats x tokens, ratio max, entropy sum
  at::Tensor loss, tokens, sums, ratio_max, entropy_sum;
  // One float32 piece needs no totals: they would give its own loss and stats back, bit for
  // bit (a float32 stat s times an integer count n <= 2^29 is exact in float64, so
  // s * n / n == s; and the policy kernels give 0 for the stats of 0 tokens).
  const bool one_piece = plan.size() == 1 && acc == at::kFloat;
  at::Tensor piece_loss_f32, piece_stats_f32;
  for (const Piece& piece : plan) {
    const bool whole = piece.whole(B, T);
    const at::Tensor piece_valid = whole ? valid : valid.slice(0, piece.r0, piece.r1).slice(1, piece.c0, piece.c1);
    const auto zeros = [&]() { return at::zeros(piece_valid.sizes(), hidden.options().dtype(acc)); };
    // the flat token range of the piece: whole rows, or a segment of one row
    const int64_t span_start = piece.r0 * T + piece.c0, span_stop = (piece.r1 - 1) * T + piece.c1;
    at::Tensor kept_hidden, kept_labels, kept;
    if (every_token) {
      kept_hidden = flat_hidden.slice(0, span_start, span_stop);
      kept_labels = flat_labels.slice(0, span_start, span_stop);
      // a masked token's hidden state (NaN, inf) must not reach grad weight as 0 * NaN (its
      // logits row is never read otherwise: the row kernels skip ignored labels)
      if (!on_device && !piece.all_valid && needs_weight) {
        kept_hidden = zero_masked_rows(kept_hidden, piece_valid.reshape({-1}));
      }
    } else {
      kept = at::arange(B * T, labels.options()).view({B, T})
                 .slice(0, piece.r0, piece.r1).slice(1, piece.c0, piece.c1).masked_select(piece_valid);
    }
    const int64_t n = every_token ? kept_hidden.size(0) : kept.numel();
    at::Tensor logits, lp, ent, saved, logprobs, entropy;
    if (n > 0) {
      if (!every_token) {
        kept_hidden = flat_hidden.index_select(0, kept);
        kept_labels = flat_labels.index_select(0, kept);
      }
      // the logits linear_logprobs gives these tokens, bit for bit (on-policy ratio 1)
      logits = RowChunk(kept_hidden).logits(buffer, weight, bias);
      std::tie(lp, ent, saved) = k.row_forward.call(logits, kept_labels, temperature, ignore_index, with_entropy,
                                                    true);
      if (every_token) {  // ignored tokens: 0 from the row kernel
        logprobs = lp.to(acc).reshape(piece_valid.sizes());
        if (with_entropy) entropy = ent.to(acc).reshape(piece_valid.sizes());
      } else {
        logprobs = zeros();
        logprobs.index_put_({piece_valid}, lp.to(acc));
        if (with_entropy) {
          entropy = zeros();
          entropy.index_put_({piece_valid}, ent.to(acc));
        }
      }
    } else {
      logprobs = zeros();
      if (with_entropy) entropy = zeros();
    }
    auto [piece_loss, piece_stats, grad, row_scale] =
        k.policy.call(logprobs, *cut(old_logprobs, piece, whole), *cut(advantages, piece, whole), piece_valid,
                      cut(weights, piece, whole), cut(ref_logprobs, piece, whole), piece.coefficients, kl, piece.agg,
                      any_grad);
    const bool scaled = piece.scale.defined() || piece.number.has_value();
    if (one_piece) {
      piece_loss_f32 = piece_loss;
      piece_stats_f32 = piece_stats;
    }
    at::Tensor piece_loss64 = !one_piece || scaled || with_entropy ? piece_loss.to(at::kDouble) : at::Tensor();
    if (piece.scale.defined()) {  // the batch's normalisation, as a device tensor
      row_scale = row_scale * piece.scale.to(row_scale.scalar_type());
      piece_loss64 = piece_loss64 * piece.scale;
    } else if (piece.number.has_value()) {  // (or a given count)
      row_scale = row_scale * *piece.number;
      piece_loss64 = piece_loss64 * *piece.number;
    }
    if (one_piece) {
      if (piece_loss64.defined()) loss = piece_loss64;
      if (with_entropy) {
        loss = loss - (row_scale.to(at::kDouble) * entropy.to(at::kDouble).sum(-1)).sum() * entropy_coef;
        entropy_sum = entropy.to(at::kDouble).sum();
      }
    } else {
      piece_stats = piece_stats.to(at::kDouble);
      const at::Tensor count = piece_stats.select(0, -1);
      const at::Tensor piece_ratio_max = piece_stats.select(0, kRatioMaxSlot);
      loss = accumulate(loss, piece_loss64);
      if (with_entropy) {
        loss = loss - (row_scale.to(at::kDouble) * entropy.to(at::kDouble).sum(-1)).sum() * entropy_coef;
      }
      tokens = accumulate(tokens, count);
      sums = accumulate(sums, piece_stats.slice(0, 0, -1) * count);
      // ratios are >= 0 (or NaN, which maximum keeps), as the 0 the totals start from
      ratio_max = ratio_max.defined() ? at::maximum(ratio_max, piece_ratio_max) : piece_ratio_max;
      if (with_entropy) entropy_sum = accumulate(entropy_sum, entropy.to(at::kDouble).sum());
    }
    if (n == 0 || !any_grad) continue;
    // the kept tokens' values, in the order of the rows of logits
    const auto kept_values = [&](const at::Tensor& t) {
      return every_token ? t.reshape({-1}).contiguous() : t.masked_select(piece_valid);
    };
    const at::Tensor grad_logprobs = kept_values(grad * row_scale.unsqueeze(-1)).to(at::kFloat);
    Opt grad_entropy;
    if (with_entropy) {
      grad_entropy = kept_values((row_scale.unsqueeze(-1) * -entropy_coef).expand(piece_valid.sizes()))
                         .to(at::kFloat);
    }
    k.row_backward_inplace.call(grad_logprobs, grad_entropy, logits, kept_labels, saved, ent, temperature,
                                ignore_index, 0);
    if (needs_hidden && every_token) {
      at::Tensor out = flat_grad_hidden.slice(0, span_start, span_stop);
      gemm_out(out, logits, weight);
    } else if (needs_hidden) {
      flat_grad_hidden.index_copy_(0, kept, gemm(logits, weight));
    }
    if (needs_weight && !grad_weight.defined()) {  // no [V, H] zero fill and read-back for one piece
      grad_weight = gemm(logits.t(), kept_hidden).to(wide ? at::kFloat : weight.scalar_type());
    } else if (needs_weight && wide) {
      grad_weight.add_(gemm(logits.t(), kept_hidden));
    } else if (needs_weight) {
      gemm_add(grad_weight, logits.t(), kept_hidden);
    }
    if (needs_bias) grad_bias.add_(logits.sum(0, false, at::kFloat));
  }
  at::Tensor stats;
  if (one_piece) {
    const int64_t n_stats = piece_stats_f32.size(0);
    stats = at::empty({n_stats + 1}, piece_stats_f32.options());
    if (!with_entropy && host_readable(piece_stats_f32) && piece_stats_f32.is_contiguous()) {
      // plain CPU float32 (one_piece): the copy and the 0 by hand, not three aten ops
      float* out = stats.mutable_data_ptr<float>();
      std::memcpy(out, piece_stats_f32.const_data_ptr<float>(), n_stats * sizeof(float));
      out[n_stats] = 0.0f;
    } else {
      stats.narrow(0, 0, n_stats).copy_(piece_stats_f32);
      if (with_entropy) {  // the entropy slot
        const at::Tensor count = piece_stats_f32.select(0, -1).to(at::kDouble);
        stats.select(0, n_stats).copy_(at::where(count.gt(0), entropy_sum / count.clamp_min(1), 0));
      } else {
        stats.select(0, n_stats).fill_(0);
      }
    }
    if (!loss.defined()) loss = piece_loss_f32;
  } else {
    if (!loss.defined()) {  // no piece: an empty batch, or no valid token in any row
      const at::Tensor zero = at::zeros({}, f64);
      loss = tokens = ratio_max = zero;
      sums = at::zeros({kRatioMaxSlot + 2}, f64);
    }
    const at::Tensor any_tokens = tokens.gt(0);
    const at::Tensor means = at::where(any_tokens, sums / tokens.clamp_min(1), 0);
    means.select(0, kRatioMaxSlot).copy_(ratio_max);
    const at::Tensor entropy_mean =
        entropy_sum.defined() ? at::where(any_tokens, entropy_sum / tokens.clamp_min(1), 0) : at::zeros({}, f64);
    stats = at::cat({means, tokens.reshape({1}), entropy_mean.reshape({1})}).to(acc);
  }
  if (needs_weight && !grad_weight.defined()) {  // no token reached the lm-head
    grad_weight = at::zeros_like(weight);
  } else if (needs_weight && wide) {
    grad_weight = grad_weight.to(weight.scalar_type());
  }
  if (needs_bias) grad_bias = grad_bias.to(bias->scalar_type());
  return {loss.to(acc), stats, grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace rlk::lm_head

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) { m.impl("linear_policy_loss", &rlk::lm_head::linear_policy_loss); }
TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("linear_policy_loss", &rlk::lm_head::linear_policy_loss); }
