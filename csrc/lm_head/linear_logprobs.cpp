// linear_logprobs' forward and backward bodies: the lm-head logits tile by tile
// (at::mm / at::addmm into reused buffers, every matmul on a multiple of kGemmRows
// rows) and the tile kernels through the dispatcher (logprobs_vocab_tile and
// logprobs_backward_inplace, or their Triton twins for backend "triton").  Only ATen
// ops and dispatcher calls: one device-generic body, registered for CPU and CUDA.
// The tiles, their order and the row padding are rlkernels/ops/_chunked.py's, so
// linear_ppo_loss (which stays on those Python helpers) gets the same logits bit for bit.
#include "linear_logprobs.h"

#include <torch/library.h>

#include "../core/lm_head.h"
#include "../dispatcher.h"
#include "tiles.h"

namespace rlk::lm_head {
namespace {

using VocabTileSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, bool,
                          bool);
using BackwardInplaceSig = void(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t);

// The tile kernels a backend runs: the compiled ops, or their Triton twins (per_backend,
// csrc/dispatcher.h), each looked up on its first use.
const c10::TypedOperatorHandle<VocabTileSig>& vocab_tile_op(c10::string_view backend) {
  return per_backend(backend, [](bool twin) {
    return op_or_twin<VocabTileSig>("rlkernels::logprobs_vocab_tile", twin);
  });
}

const c10::TypedOperatorHandle<BackwardInplaceSig>& backward_inplace_op(c10::string_view backend) {
  return per_backend(backend, [](bool twin) {
    return op_or_twin<BackwardInplaceSig>("rlkernels::logprobs_backward_inplace", twin);
  });
}

// The ValueError of a label outside [0, vocab) that is not ignore_index, naming the first
// (the public function's message, rlkernels/ops/_logits.py label_range).
[[noreturn]] void bad_label(int64_t vocab, int64_t ignore_index, int64_t value, int64_t where) {
  TORCH_CHECK_VALUE(false, "linear_logprobs: labels must lie in [0, ", vocab, ") or equal ignore_index=", ignore_index,
                    "; got ", value, " at flat index ", where);
}

// Indices of the rows whose label is not ignore_index, or nullopt when all are kept.  With
// drop_ignored false (CUDA outside the checked mode, torch.compile: the caller may not read
// the labels on the host, rlkernels._checkmode.reads_data) every row is kept: ignored rows
// go through the matmuls and the kernels give them 0 and no gradient.  Where the labels
// are read, their range is checked in the same pass (the public function leaves it here).
std::optional<at::Tensor> kept_rows(const at::Tensor& labels, int64_t ignore_index, int64_t vocab,
                                    bool drop_ignored) {
  if (!drop_ignored || labels.numel() == 0) return std::nullopt;
  const bool direct = host_readable(labels) && labels.scalar_type() == at::kLong && labels.is_contiguous();
  if (!direct) {  // (fake tensors in the checked mode land here, and raise at the first read)
    const at::Tensor keep = labels.ne(ignore_index);
    const at::Tensor bad = keep.logical_and(labels.lt(0).logical_or(labels.ge(vocab)));
    if (bad.any().item<bool>()) {
      const int64_t where = bad.flatten().nonzero()[0][0].item<int64_t>();
      bad_label(vocab, ignore_index, labels.flatten()[where].item<int64_t>(), where);
    }
    if (keep.all().item<bool>()) return std::nullopt;
    return keep.nonzero().squeeze(1);
  }
  const int64_t* label = labels.const_data_ptr<int64_t>();
  const int64_t n = labels.numel();
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (label[i] == ignore_index) continue;
    if (label[i] < 0 || label[i] >= vocab) bad_label(vocab, ignore_index, label[i], i);
    ++kept;
  }
  if (kept == n) return std::nullopt;
  at::Tensor rows = at::empty({kept}, labels.options());
  int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (label[i] != ignore_index) *row++ = i;
  }
  return rows;
}

std::pair<int64_t, int64_t> tile_sizes(int64_t n, int64_t vocab, int64_t tile_tokens, int64_t tile_vocab,
                                       int64_t budget) {
  TORCH_CHECK_VALUE(tile_tokens >= 0 && tile_vocab >= 0,
                    "linear_logprobs: tile_tokens and tile_vocab must be >= 0 (0: from the budget), got ",
                    tile_tokens, " and ", tile_vocab);
  const auto [tokens, block] = tiles(n, vocab, budget);
  return {tile_tokens ? tile_tokens : tokens, tile_vocab ? tile_vocab : block};
}

std::optional<at::Tensor> slice(const std::optional<at::Tensor>& t, int64_t start, int64_t stop) {
  if (!t.has_value()) return std::nullopt;
  return rows_of(*t, start, stop);
}

// hidden [..., H] as [N, H] and labels [...] as [N], N = labels.numel() (hidden's
// leading shape may hold a 0, where -1 would be ambiguous).
std::pair<at::Tensor, at::Tensor> flat(const at::Tensor& hidden, const at::Tensor& labels) {
  const int64_t N = labels.numel();
  return {hidden.reshape({N, hidden.size(-1)}), labels.reshape({N})};
}

// A per-token tensor of labels' shape, as [N].
at::Tensor per_token(const at::Tensor& t, const at::Tensor& labels, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == labels.sizes(), "linear_logprobs_backward: ", name, " must have the labels' shape ",
                    labels.sizes(), ", got ", t.sizes());
  return t.reshape({labels.numel()});
}

std::optional<at::Tensor> pick(const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& rows,
                               int64_t N) {
  if (!rows.has_value() || !t.has_value() || t->size(0) != N) return t;
  return t->index_select(0, *rows);
}

at::Tensor pick(const at::Tensor& t, const std::optional<at::Tensor>& rows, int64_t N) {
  if (!rows.has_value() || t.size(0) != N) return t;
  return t.index_select(0, *rows);
}

}  // namespace

LinearLogprobsOutputs linear_logprobs_body(const at::Tensor& lead_hidden, const at::Tensor& weight,
                                           const at::Tensor& lead_labels, const std::optional<at::Tensor>& bias,
                                           double temperature, int64_t ignore_index, bool with_entropy,
                                           bool with_top1, int64_t tile_tokens, int64_t tile_vocab, int64_t budget,
                                           bool drop_ignored, c10::string_view backend,
                                           std::vector<at::Tensor>* keep) {
  const auto vocab_tile = vocab_tile_op(backend);
  const auto [hidden, labels] = flat(lead_hidden, lead_labels);
  const int64_t N = hidden.size(0), vocab = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const std::optional<at::Tensor> rows = kept_rows(labels, ignore_index, vocab, drop_ignored);
  const at::Tensor kept_hidden = rows ? hidden.index_select(0, *rows) : hidden;
  const at::Tensor kept_labels = rows ? labels.index_select(0, *rows) : labels;
  const int64_t n = kept_hidden.size(0);
  // per kept token: running (max, sum, entropy sum, label logit), then (log p, H, max, ln s);
  // with_top1 adds the arg-max flag as a fifth value
  const at::Tensor state = at::empty({n, with_top1 ? 5 : 4}, f32);
  if (n > 0 && vocab > 0) {
    const auto [chunk, block] = tile_sizes(n, vocab, tile_tokens, tile_vocab, budget);
    if (keep != nullptr && !keeps_tiles(n, vocab, chunk, tile_tokens || tile_vocab, budget)) keep = nullptr;
    // token chunks outside, vocabulary blocks inside: one reused buffer, or with `keep`
    // a buffer per tile (the padded tile: the logits the backward would recompute)
    at::Tensor buffer;
    if (keep == nullptr) {
      buffer = at::empty({padded_rows(std::min(chunk, n)) * std::min(block, vocab)}, hidden.options());
    }
    for (int64_t t0 = 0; t0 < n; t0 += chunk) {
      const int64_t t1 = std::min(t0 + chunk, n);
      const int64_t padded = padded_rows(t1 - t0);
      const RowChunk token_chunk(rows_of(kept_hidden, t0, t1));
      const at::Tensor chunk_labels = rows_of(kept_labels, t0, t1);
      const at::Tensor chunk_state = rows_of(state, t0, t1);
      for (int64_t v0 = 0; v0 < vocab; v0 += block) {
        const int64_t v1 = std::min(v0 + block, vocab);
        at::Tensor tile;
        if (keep == nullptr) {
          tile = rows_of(buffer, 0, padded * (v1 - v0)).view({padded, v1 - v0});
        } else {
          tile = at::empty({padded, v1 - v0}, hidden.options());
          keep->push_back(tile);
        }
        const at::Tensor logits = token_chunk.logits(tile, rows_of(weight, v0, v1), slice(bias, v0, v1));
        vocab_tile.call(logits, chunk_labels, chunk_state, temperature, ignore_index, v0, with_entropy, v1 == vocab);
      }
    }
  }
  const at::Tensor no_top1 = at::empty({0}, hidden.options().dtype(at::kBool));
  const auto lead = lead_labels.sizes();
  if (!rows) {  // every row went through the kernels: the outputs are state's columns (copies)
    auto column = [&](int64_t c) { return state.select(1, c).clone(at::MemoryFormat::Contiguous).view(lead); };
    return {column(0), with_entropy ? column(1) : state.new_empty({0}),
            state.slice(1, 2, 4).clone(at::MemoryFormat::Contiguous),
            with_top1 ? state.select(1, 4).ne(0).view(lead) : no_top1};
  }
  at::Tensor values = at::zeros({N}, f32);
  at::Tensor entropies = at::zeros({with_entropy ? N : 0}, f32);
  at::Tensor saved = at::zeros({N, 2}, f32);
  at::Tensor top1 = with_top1 ? at::zeros({N}, hidden.options().dtype(at::kBool)) : no_top1;
  values.index_copy_(0, *rows, state.select(1, 0));
  saved.index_copy_(0, *rows, state.slice(1, 2, 4));
  if (with_entropy) entropies.index_copy_(0, *rows, state.select(1, 1));
  if (with_top1) top1.index_copy_(0, *rows, state.select(1, 4).ne(0));
  return {values.view(lead), with_entropy ? entropies.view(lead) : entropies, saved,
          with_top1 ? top1.view(lead) : top1};
}

LinearLogprobsGrads linear_logprobs_backward_body(
    const at::Tensor& lead_grad_logprobs, const std::optional<at::Tensor>& lead_grad_entropy,
    const at::Tensor& lead_hidden, const at::Tensor& weight, const at::Tensor& lead_labels,
    const std::optional<at::Tensor>& bias, const at::Tensor& saved, const at::Tensor& lead_entropies,
    double temperature, int64_t ignore_index, int64_t tile_tokens, int64_t tile_vocab, int64_t budget,
    bool drop_ignored, c10::string_view backend, bool needs_hidden, bool needs_weight, bool needs_bias,
    const std::vector<at::Tensor>* kept) {
  const auto backward_inplace = backward_inplace_op(backend);
  const auto [hidden, labels] = flat(lead_hidden, lead_labels);
  const at::Tensor grad_logprobs = per_token(lead_grad_logprobs, lead_labels, "grad_logprobs");
  std::optional<at::Tensor> grad_entropy;
  if (lead_grad_entropy) grad_entropy = per_token(*lead_grad_entropy, lead_labels, "grad_entropy");
  const at::Tensor entropies = grad_entropy ? per_token(lead_entropies, lead_labels, "entropies") : lead_entropies;
  const int64_t N = hidden.size(0), vocab = weight.size(0);
  const std::optional<at::Tensor> rows = kept_rows(labels, ignore_index, vocab, drop_ignored);
  const at::Tensor kept_hidden = pick(hidden, rows, N);
  const at::Tensor kept_labels = pick(labels, rows, N);
  const at::Tensor kept_grad = pick(grad_logprobs, rows, N);
  const std::optional<at::Tensor> kept_grad_entropy = pick(grad_entropy, rows, N);
  const at::Tensor kept_saved = pick(saved, rows, N);
  const at::Tensor kept_entropies = kept_grad_entropy ? pick(entropies, rows, N) : entropies.new_empty({0});
  needs_bias = needs_bias && bias.has_value();

  const int64_t n = kept_hidden.size(0);
  const auto [chunk, block] = tile_sizes(n, vocab, tile_tokens, tile_vocab, budget);
  // Vocabulary blocks outside, token chunks inside: each weight block's gradient comes from
  // whole token chunks, in one matmul when the chunk is all tokens; the hidden gradient
  // accumulates over vocabulary blocks, in float32 for 16-bit inputs, rounded once.
  const bool narrow = hidden.scalar_type() == at::kHalf || hidden.scalar_type() == at::kBFloat16;
  const auto wide = hidden.options().dtype(narrow ? at::kFloat : hidden.scalar_type());
  at::Tensor grad_hidden = needs_hidden ? at::zeros(kept_hidden.sizes(), wide) : at::Tensor();
  at::Tensor grad_weight;
  if (needs_weight) grad_weight = n > 0 ? at::empty_like(weight) : at::zeros_like(weight);
  at::Tensor grad_bias = needs_bias ? at::zeros({vocab}, weight.options().dtype(at::kFloat)) : at::Tensor();
  const bool whole = chunk >= n;
  at::Tensor block_sum;
  if (needs_weight && !whole) {
    block_sum = at::empty({std::min(block, vocab), weight.size(1)}, weight.options().dtype(wide.dtype()));
  }
  at::Tensor buffer;
  if (n > 0 && kept == nullptr) {
    buffer = at::empty({padded_rows(std::min(chunk, n)) * std::min(block, vocab)}, hidden.options());
  }
  const int64_t blocks = ceil_div(vocab, block);
  std::vector<RowChunk> chunks;  // each token chunk's rows for the matmuls, made once
  if (n > 0 && kept == nullptr) {
    for (int64_t t0 = 0; t0 < n; t0 += chunk) chunks.emplace_back(rows_of(kept_hidden, t0, std::min(t0 + chunk, n)));
  }
  for (int64_t v0 = 0; n > 0 && v0 < vocab; v0 += block) {
    const int64_t v1 = std::min(v0 + block, vocab);
    const at::Tensor weight_block = rows_of(weight, v0, v1);
    const std::optional<at::Tensor> bias_block = slice(bias, v0, v1);
    if (block_sum.defined()) block_sum.zero_();
    for (int64_t t0 = 0; t0 < n; t0 += chunk) {
      const int64_t t1 = std::min(t0 + chunk, n);
      // the forward's logits, bit for bit (same tiles): the saved row statistics then
      // describe exactly these logits
      at::Tensor dlogits;
      if (kept != nullptr) {
        dlogits = rows_of((*kept)[(t0 / chunk) * blocks + v0 / block], 0, t1 - t0);
      } else {
        const int64_t padded = padded_rows(t1 - t0);
        dlogits = chunks[t0 / chunk].logits(rows_of(buffer, 0, padded * (v1 - v0)).view({padded, v1 - v0}),
                                            weight_block, bias_block);
      }
      std::optional<at::Tensor> chunk_grad_entropy;
      if (kept_grad_entropy) chunk_grad_entropy = rows_of(*kept_grad_entropy, t0, t1);
      backward_inplace.call(rows_of(kept_grad, t0, t1), chunk_grad_entropy, dlogits, rows_of(kept_labels, t0, t1),
                            rows_of(kept_saved, t0, t1),
                            kept_grad_entropy ? rows_of(kept_entropies, t0, t1) : kept_entropies, temperature,
                            ignore_index, v0);
      const at::Tensor chunk_hidden = rows_of(kept_hidden, t0, t1);
      if (needs_hidden) {
        at::Tensor rows_grad = rows_of(grad_hidden, t0, t1);
        if (narrow) {
          rows_grad.add_(gemm(dlogits, weight_block));
        } else {
          gemm_add(rows_grad, dlogits, weight_block);
        }
      }
      if (needs_weight) {
        if (whole) {
          at::Tensor out = rows_of(grad_weight, v0, v1);
          gemm_out(out, dlogits.t(), chunk_hidden);
        } else if (narrow) {
          rows_of(block_sum, 0, v1 - v0).add_(gemm(dlogits.t(), chunk_hidden));
        } else {
          gemm_add(rows_of(block_sum, 0, v1 - v0), dlogits.t(), chunk_hidden);
        }
      }
      if (needs_bias) rows_of(grad_bias, v0, v1).add_(at::sum(dlogits, {0}, false, at::kFloat));
    }
    if (block_sum.defined()) rows_of(grad_weight, v0, v1).copy_(rows_of(block_sum, 0, v1 - v0));
  }
  if (needs_hidden && narrow) grad_hidden = grad_hidden.to(hidden.scalar_type());
  if (needs_hidden && rows) {
    at::Tensor full = at::zeros_like(hidden);
    full.index_copy_(0, *rows, grad_hidden);
    grad_hidden = full;
  }
  if (needs_hidden) grad_hidden = grad_hidden.view(lead_hidden.sizes());
  if (needs_bias) grad_bias = grad_bias.to(bias->scalar_type());
  const at::Tensor none = hidden.new_empty({0});
  return {needs_hidden ? grad_hidden : none, needs_weight ? grad_weight : none, needs_bias ? grad_bias : none};
}

namespace {

// The registered kernels (the bodies without the autograd's tile hand-over).
LinearLogprobsOutputs linear_logprobs_op(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                         const std::optional<at::Tensor>& bias, double temperature,
                                         int64_t ignore_index, bool with_entropy, bool with_top1, int64_t tile_tokens,
                                         int64_t tile_vocab, int64_t budget, bool drop_ignored,
                                         c10::string_view backend) {
  return linear_logprobs_body(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1,
                              tile_tokens, tile_vocab, budget, drop_ignored, backend);
}

LinearLogprobsGrads linear_logprobs_backward_op(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias, const at::Tensor& saved,
    const at::Tensor& entropies, double temperature, int64_t ignore_index, int64_t tile_tokens, int64_t tile_vocab,
    int64_t budget, bool drop_ignored, c10::string_view backend, bool needs_hidden, bool needs_weight,
    bool needs_bias) {
  return linear_logprobs_backward_body(grad_logprobs, grad_entropy, hidden, weight, labels, bias, saved, entropies,
                                       temperature, ignore_index, tile_tokens, tile_vocab, budget, drop_ignored,
                                       backend, needs_hidden, needs_weight, needs_bias);
}

}  // namespace
}  // namespace rlk::lm_head

// Device-generic (ATen ops and dispatcher calls): the same kernel for both keys.
TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("linear_logprobs", &rlk::lm_head::linear_logprobs_op);
  m.impl("linear_logprobs_backward", &rlk::lm_head::linear_logprobs_backward_op);
}

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("linear_logprobs", &rlk::lm_head::linear_logprobs_op);
  m.impl("linear_logprobs_backward", &rlk::lm_head::linear_logprobs_backward_op);
}
