// Torch-side argument handling shared by the CPU and CUDA implementations of
// the logprobs family (logprobs, kl_from_logits, kl_penalty): the checks that
// keep direct torch.ops calls memory-safe, and the outputs each op allocates.
// The Python layer validates first, with messages naming the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#include "../core/kl_penalty.h"
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

// Checks the forward's arguments; returns its float32 outputs: log-probs, the
// entropy (empty without it) and the (max, log-sum-exp) pair saved per row.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_outputs(const at::Tensor& logits,
                                                                       const at::Tensor& labels, double temperature,
                                                                       bool with_entropy) {
  check_labels_shape(logits, labels, "logprobs");
  TORCH_CHECK(temperature > 0, "logprobs: temperature must be > 0, got ", temperature);
  const auto f32 = logits.options().dtype(at::kFloat);
  return {at::empty(leading_shape(logits), f32),
          at::empty(with_entropy ? leading_shape(logits) : std::vector<int64_t>{0}, f32),
          at::empty(leading_shape(logits, 2), f32)};
}

inline void check_logprobs_backward(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                    const at::Tensor& entropy, int64_t vocab_start) {
  check_labels_shape(logits, labels, "logprobs_backward");
  TORCH_CHECK(vocab_start >= 0, "logprobs_backward: vocab_start must be >= 0, got ", vocab_start);
  check_row_floats(grad_logprobs, logits, "grad_logprobs", 1);
  check_row_floats(saved, logits, "saved", 2);
  if (grad_entropy.has_value()) {
    check_row_floats(*grad_entropy, logits, "grad_entropy", 1);
    check_row_floats(entropy, logits, "entropy", 1);
  }
}

// logprobs_vocab_tile: a tile of columns [vocab_start, vocab_start + V') of the
// rows, and their running state (4 floats a row, or 5 with the arg-max flag,
// core/logprobs.h).  Returns the state's width.
inline int check_vocab_tile(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                            double temperature, int64_t vocab_start) {
  check_labels_shape(logits, labels, "logprobs_vocab_tile");
  TORCH_CHECK(temperature > 0, "logprobs_vocab_tile: temperature must be > 0, got ", temperature);
  TORCH_CHECK(vocab_start >= 0, "logprobs_vocab_tile: vocab_start must be >= 0, got ", vocab_start);
  const int64_t N = leading_numel(logits);
  const int width = N > 0 && state.numel() == N * kTileWidthTop1 ? kTileWidthTop1 : kTileWidth;
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.numel() == N * width &&
                  state.device() == logits.device(),
              "logprobs_vocab_tile: state must be a contiguous float32 tensor with 4 values per row of logits "
              "(5 to also track whether the label is the arg-max)");
  return width;
}

// The logits' gradient, written by into(grad) (a backend's kernel, which needs
// a row layout it can address) into a fresh tensor of the logits' shape...
template <class Into>
at::Tensor logprobs_grad_fresh(const at::Tensor& logits, Into&& into) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  into(grad);
  return grad;
}

// ...or over the logits themselves (inplace_backward); a layout the kernel
// cannot address is computed aside and copied in.
template <class Into>
void logprobs_grad_inplace(const at::Tensor& logits, Into&& into) {
  RowIndex rows;
  if (row_index_of(logits, &rows)) into(logits);
  else logits.copy_(logprobs_grad_fresh(logits, into));
}

// ---- kl_from_logits ------------------------------------------------------------------------------

inline void check_kl_pair(const at::Tensor& logits, const at::Tensor& ref_logits) {
  TORCH_CHECK(logits.dim() >= 1, "kl_from_logits: logits must have a vocabulary dimension");
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), "kl_from_logits: ref_logits must have the shape of logits ",
              logits.sizes(), ", got ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type() && ref_logits.device() == logits.device(),
              "kl_from_logits: ref_logits must have the dtype and device of logits");
}

inline const bool* optional_row_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& logits) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->device() == logits.device() &&
                  mask->sizes() == logits.sizes().slice(0, logits.dim() - 1),
              "kl_from_logits: mask must be a contiguous bool tensor of the leading shape of logits");
  return mask->data_ptr<bool>();
}

// Checks the forward's arguments; returns its float32 outputs: the KL per row
// and the five row statistics the backward reuses.
inline std::tuple<at::Tensor, at::Tensor> kl_outputs(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                     double temperature) {
  check_kl_pair(logits, ref_logits);
  TORCH_CHECK(temperature > 0, "kl_from_logits: temperature must be > 0, got ", temperature);
  const auto f32 = logits.options().dtype(at::kFloat);
  return {at::empty(leading_shape(logits), f32), at::empty(leading_shape(logits, 5), f32)};
}

// Checks the backward's arguments; returns the gradients of the logits and of
// the reference logits (empty where not wanted).
inline std::tuple<at::Tensor, at::Tensor> kl_grad_outputs(const at::Tensor& grad_kl, const at::Tensor& logits,
                                                          const at::Tensor& ref_logits, const at::Tensor& saved,
                                                          bool logits_grad, bool ref_grad) {
  check_kl_pair(logits, ref_logits);
  check_row_floats(grad_kl, logits, "grad_kl", 1);
  check_row_floats(saved, logits, "saved", 5);
  return {at::empty(logits_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options()),
          at::empty(ref_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options())};
}

// ---- kl_penalty ------------------------------------------------------------------------------------

struct KlPenaltyArgs {
  int code;                // the estimator (core/kl_penalty.h)
  at::Tensor lp, ref;      // contiguous inputs
  at::Tensor value, slope; // outputs in the accumulation dtype
};

inline KlPenaltyArgs kl_penalty_args(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                     c10::string_view kind, double clamp) {
  const int code = kl_kind_code(std::string(kind).c_str());
  TORCH_CHECK(code >= 0, "kl_penalty: unknown kind '", kind, "'");
  TORCH_CHECK(clamp > 0, "kl_penalty: clamp must be > 0, got ", clamp);
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes() && ref_logprobs.scalar_type() == logprobs.scalar_type() &&
                  ref_logprobs.device() == logprobs.device(),
              "kl_penalty: ref_logprobs must have the shape, dtype and device of logprobs");
  const at::Tensor lp = logprobs.contiguous();
  const auto out = lp.options().dtype(out_dtype_for(lp.scalar_type()));
  return {code, lp, ref_logprobs.contiguous(), at::empty(lp.sizes(), out), at::empty(lp.sizes(), out)};
}

}  // namespace rlk
