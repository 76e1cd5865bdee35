// logprobs, logprobs_vocab_tile and logprobs_backward: the checks that keep
// direct torch.ops calls memory-safe (the Python layer validates first, naming
// the argument), the outputs, and the one LogprobsParams both backends read.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../core/logprobs.h"
#include "../torch_common.h"

namespace rlk {

inline void check_labels_shape(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.dim() >= 1, op, ": logits must have a vocabulary dimension");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.is_contiguous(), op, ": labels must be contiguous");
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
              ": labels must have the leading shape of logits ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels and logits must be on one device");
}

// A contiguous float32 tensor holding `per_row` values for each row of logits.
inline void check_row_floats(const at::Tensor& t, const at::Tensor& logits, const char* name, int64_t per_row) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == leading_numel(logits) * per_row &&
                  t.device() == logits.device(),
              name, " must be a contiguous float32 tensor with ", per_row, " value(s) per row of logits");
}

// ---- logprobs ----------------------------------------------------------------------------------

// The logits' dtype as the kernels take it (float32, bfloat16 or float16).
inline Dtype logits_dtype(const at::Tensor& logits, const char* op) {
  const at::ScalarType t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", t);
  return dtype_of(t, op);
}

// What every op of the family fills alike: the rows of `logits` (x: the
// logits themselves, or a contiguous copy where their rows cannot be addressed
// in place, which the caller keeps alive), the labels and the scalars.
inline LogprobsParams logits_rows(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                  int64_t ignore_index, bool with_entropy, const char* op, at::Tensor& x) {
  LogprobsParams p;
  x = rows_readable(logits, &p.rows);
  p.logits = x.data_ptr();
  p.N = leading_numel(logits);
  p.V = logits.size(-1);
  p.dtype = logits_dtype(x, op);
  p.labels = labels.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.temperature = temperature;
  p.with_entropy = with_entropy;
  return p;
}

struct LogprobsOutputs {
  at::Tensor logits;  // as the kernel reads them
  at::Tensor logprobs, entropy, saved;
};

// The forward: float32 log-probs, the entropy (empty without it) and the
// (max, log-sum-exp) pair saved per row.
inline LogprobsParams logprobs_args(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                    int64_t ignore_index, bool with_entropy, LogprobsOutputs& out) {
  check_labels_shape(logits, labels, "logprobs");
  TORCH_CHECK(temperature > 0, "logprobs: temperature must be > 0, got ", temperature);
  const auto f32 = logits.options().dtype(at::kFloat);
  out.logprobs = at::empty(leading_shape(logits), f32);
  out.entropy = at::empty(with_entropy ? leading_shape(logits) : std::vector<int64_t>{0}, f32);
  out.saved = at::empty(leading_shape(logits, 2), f32);
  LogprobsParams p = logits_rows(logits, labels, temperature, ignore_index, with_entropy, "logprobs", out.logits);
  p.logprobs = out.logprobs.data_ptr<float>();
  p.entropy = with_entropy ? out.entropy.data_ptr<float>() : nullptr;
  p.saved = out.saved.data_ptr<float>();
  return p;
}

// The backward of (a vocabulary tile of) the rows into `grad` (a fresh tensor
// or the logits themselves, with an addressable row layout).
inline LogprobsParams logprobs_backward_args(const at::Tensor& grad_logprobs,
                                             const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                             const at::Tensor& labels, const at::Tensor& saved,
                                             const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                             int64_t vocab_start, const at::Tensor& grad, at::Tensor& x) {
  check_labels_shape(logits, labels, "logprobs_backward");
  TORCH_CHECK(vocab_start >= 0, "logprobs_backward: vocab_start must be >= 0, got ", vocab_start);
  check_row_floats(grad_logprobs, logits, "grad_logprobs", 1);
  check_row_floats(saved, logits, "saved", 2);
  const bool with_entropy = grad_entropy.has_value();
  if (with_entropy) {
    check_row_floats(*grad_entropy, logits, "grad_entropy", 1);
    check_row_floats(entropy, logits, "entropy", 1);
  }
  LogprobsParams p =
      logits_rows(logits, labels, temperature, ignore_index, with_entropy, "logprobs_backward", x);
  TORCH_CHECK(row_index_of(grad, &p.grad_rows), "internal: gradient without a row layout");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "internal: gradient dtype");
  p.grad = grad.data_ptr();
  p.vocab_start = vocab_start;
  p.grad_logprobs = grad_logprobs.data_ptr<float>();
  p.grad_entropy = with_entropy ? grad_entropy->data_ptr<float>() : nullptr;
  p.entropy = with_entropy ? entropy.data_ptr<float>() : nullptr;
  p.saved = saved.data_ptr<float>();
  return p;
}

// logprobs_vocab_tile: a tile of columns [vocab_start, vocab_start + V') of the
// rows, and their running state (4 floats a row, or 5 with the arg-max flag), or one
// state per vocabulary chunk where the backend's kernel has that mode (chunk_states;
// core/logprobs.h).
inline LogprobsParams logprobs_vocab_tile_args(const at::Tensor& logits, const at::Tensor& labels,
                                               const at::Tensor& state, double temperature, int64_t ignore_index,
                                               int64_t vocab_start, bool with_entropy, bool finish, at::Tensor& x,
                                               bool chunk_states = false) {
  check_labels_shape(logits, labels, "logprobs_vocab_tile");
  TORCH_CHECK(temperature > 0, "logprobs_vocab_tile: temperature must be > 0, got ", temperature);
  TORCH_CHECK(vocab_start >= 0, "logprobs_vocab_tile: vocab_start must be >= 0, got ", vocab_start);
  const int64_t N = leading_numel(logits);
  const int64_t V = logits.size(-1);
  // [..., C, 4] with the labels' leading shape: one state per vocabulary chunk (core/logprobs.h)
  const bool chunked = state.dim() == labels.dim() + 2 && state.size(-1) == kTileWidth &&
                       state.sizes().slice(0, labels.dim()) == labels.sizes();
  const int64_t chunks = chunked ? state.size(-2) : 0;
  const int width = !chunked && N > 0 && state.numel() == N * kTileWidthTop1 ? kTileWidthTop1 : kTileWidth;
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() &&
                  state.numel() == N * width * std::max<int64_t>(chunks, 1) && state.device() == logits.device(),
              "logprobs_vocab_tile: state must be a contiguous float32 tensor with 4 values per row of logits "
              "(5 to also track whether the label is the arg-max), or [..., C, 4] with 4 per vocabulary chunk");
  if (chunked) {
    TORCH_CHECK(chunk_states, "logprobs_vocab_tile: a state per vocabulary chunk ([..., C, 4]) is supported by the CPU "
                "kernel only so far");
    TORCH_CHECK(V == 0 || vocab_start % kVocabChunk == 0, "logprobs_vocab_tile: with a state per chunk, vocab_start "
                "must be a multiple of the vocabulary chunk (", kVocabChunk, "), got ", vocab_start);
    TORCH_CHECK(V == 0 || chunk_of(vocab_start) + vocab_chunks(V) <= chunks, "logprobs_vocab_tile: the tile [",
                vocab_start, ", ", vocab_start + V, ") reaches past the state's ", chunks, " chunks");
    TORCH_CHECK(!finish || vocab_chunks(vocab_start + V) == chunks, "logprobs_vocab_tile: with finish, the row ends "
                "at ", vocab_start + V, " columns, which is ", vocab_chunks(vocab_start + V),
                " chunks, but state holds ", chunks);
  }
  LogprobsParams p =
      logits_rows(logits, labels, temperature, ignore_index, with_entropy, "logprobs_vocab_tile", x);
  p.vocab_start = vocab_start;
  p.state = state.data_ptr<float>();
  p.width = width;
  p.finish = finish;
  p.chunks = chunks;
  return p;
}

// A backend's logprobs_backward kernel: reads p, writes p.grad (the caller's
// device guard, if any, comes from `logits`).
using LogprobsBackwardRun = void (*)(const LogprobsParams& p, const at::Tensor& logits);

template <LogprobsBackwardRun run>
void logprobs_backward_into(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t vocab_start,
                            const at::Tensor& grad) {
  at::Tensor x;
  run(logprobs_backward_args(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                             vocab_start, grad, x),
      logits);
}

// logprobs_backward: the logits' gradient in a fresh tensor of their shape...
template <LogprobsBackwardRun run>
at::Tensor logprobs_backward_op(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                int64_t vocab_start) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  logprobs_backward_into<run>(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                              vocab_start, grad);
  return grad;
}

// ...and logprobs_backward_inplace: over the logits themselves, or, for a layout
// the kernels cannot address, computed aside and copied in.
template <LogprobsBackwardRun run>
void logprobs_backward_inplace_op(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                  const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                  int64_t vocab_start) {
  RowIndex rows;
  if (row_index_of(logits, &rows)) {
    logprobs_backward_into<run>(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature,
                                ignore_index, vocab_start, logits);
  } else {
    logits.copy_(logprobs_backward_op<run>(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature,
                                           ignore_index, vocab_start));
  }
}

}  // namespace rlk
