// kl_from_logits and its backward: checks, outputs and the one
// KlFromLogitsParams both backends read (the Python layer validates first,
// naming the argument).
#pragma once
#include "../core/kl_from_logits.h"
#include "logprobs.h"

namespace rlk {

// Both rows' layouts (a and b: the logits as the kernel reads them, kept alive
// by the caller), the per-row mask and the temperature.
inline KlFromLogitsParams kl_from_logits_params(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                const c10::optional<at::Tensor>& mask, double temperature,
                                                const char* op, at::Tensor& a, at::Tensor& b) {
  KlFromLogitsParams p;
  a = rows_readable(logits, &p.rows);
  b = rows_readable(ref_logits, &p.ref_rows);
  p.dtype = logits_dtype(a, op);
  p.logits = a.data_ptr();
  p.ref = b.data_ptr();
  p.N = leading_numel(logits);
  p.V = logits.size(-1);
  p.temperature = temperature;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->device() == logits.device() &&
                    mask->sizes() == logits.sizes().slice(0, logits.dim() - 1),
                "kl_from_logits: mask must be a contiguous bool tensor of the leading shape of logits");
    p.mask = mask->data_ptr<bool>();
  }
  return p;
}

inline void check_kl_pair(const at::Tensor& logits, const at::Tensor& ref_logits) {
  TORCH_CHECK(logits.dim() >= 1, "kl_from_logits: logits must have a vocabulary dimension");
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), "kl_from_logits: ref_logits must have the shape of logits ",
              logits.sizes(), ", got ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type() && ref_logits.device() == logits.device(),
              "kl_from_logits: ref_logits must have the dtype and device of logits");
}

struct KlFromLogitsTensors {
  at::Tensor a, b;           // the two logits as the kernel reads them
  at::Tensor first, second;  // outputs: (kl, saved), or the two gradients
};

// The forward: float32 KL per row and the five row statistics the backward reuses.
inline KlFromLogitsParams kl_from_logits_args(const at::Tensor& logits, const at::Tensor& ref_logits,
                                              const c10::optional<at::Tensor>& mask, double temperature,
                                              KlFromLogitsTensors& t) {
  check_kl_pair(logits, ref_logits);
  TORCH_CHECK(temperature > 0, "kl_from_logits: temperature must be > 0, got ", temperature);
  const auto f32 = logits.options().dtype(at::kFloat);
  t.first = at::empty(leading_shape(logits), f32);
  t.second = at::empty(leading_shape(logits, 5), f32);
  KlFromLogitsParams p = kl_from_logits_params(logits, ref_logits, mask, temperature, "kl_from_logits", t.a, t.b);
  p.kl = t.first.data_ptr<float>();
  p.saved = t.second.data_ptr<float>();
  return p;
}

// The backward: the gradients of the logits and of the reference logits
// (dense, empty where not wanted).
inline KlFromLogitsParams kl_from_logits_backward_args(const at::Tensor& grad_kl, const at::Tensor& logits,
                                                       const at::Tensor& ref_logits,
                                                       const c10::optional<at::Tensor>& mask, const at::Tensor& saved,
                                                       double temperature, bool logits_grad, bool ref_grad,
                                                       KlFromLogitsTensors& t) {
  check_kl_pair(logits, ref_logits);
  check_row_floats(grad_kl, logits, "grad_kl", 1);
  check_row_floats(saved, logits, "saved", 5);
  t.first = at::empty(logits_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options());
  t.second = at::empty(ref_grad ? logits.sizes() : at::IntArrayRef{0}, logits.options());
  KlFromLogitsParams p =
      kl_from_logits_params(logits, ref_logits, mask, temperature, "kl_from_logits_backward", t.a, t.b);
  p.grad_kl = grad_kl.data_ptr<float>();
  p.saved = saved.data_ptr<float>();
  p.grad_logits = logits_grad ? t.first.data_ptr() : nullptr;
  p.grad_ref = ref_grad ? t.second.data_ptr() : nullptr;
  return p;
}

// kl_vocab_tile: a tile [vocab_start, vocab_start + V') of both rows and their
// per-chunk state [..., C, kKlSlotWidth] (core/kl_from_logits.h); chunk_states: the
// backend's kernel has that mode (the CPU's so far).
inline KlFromLogitsParams kl_vocab_tile_args(const at::Tensor& logits, const at::Tensor& ref_logits,
                                             const at::Tensor& state, double temperature, int64_t vocab_start,
                                             bool finish, KlFromLogitsTensors& t, bool chunk_states) {
  const char* op = "kl_vocab_tile";
  TORCH_CHECK(logits.dim() >= 1, op, ": logits must have a vocabulary dimension");
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), op, ": ref_logits must have the shape of logits ",
              logits.sizes(), ", got ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type() && ref_logits.device() == logits.device(), op,
              ": ref_logits must have the dtype and device of logits");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  const int64_t V = logits.size(-1);
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.device() == logits.device() &&
                  state.dim() == logits.dim() + 1 && state.size(-1) == kKlSlotWidth &&
                  state.sizes().slice(0, lead.size()) == lead,
              op, ": state must be a contiguous float32 tensor [..., C, ", kKlSlotWidth,
              "] with the leading shape of logits ", lead, " (one slot per vocabulary chunk), got ", state.sizes(),
              " ", state.scalar_type());
  TORCH_CHECK(chunk_states, op, ": a state per vocabulary chunk is supported by the CPU kernel only so far");
  const int64_t chunks = state.size(-2);
  TORCH_CHECK(V == 0 || vocab_start % kVocabChunk == 0, op, ": vocab_start must be a multiple of the vocabulary "
              "chunk (", kVocabChunk, "), got ", vocab_start);
  TORCH_CHECK(V == 0 || chunk_of(vocab_start) + vocab_chunks(V) <= chunks, op, ": the tile [", vocab_start, ", ",
              vocab_start + V, ") reaches past the state's ", chunks, " chunks");
  TORCH_CHECK(!finish || vocab_chunks(vocab_start + V) == chunks, op, ": with finish, the row ends at ",
              vocab_start + V, " columns, which is ", vocab_chunks(vocab_start + V), " chunks, but state holds ",
              chunks);
  KlFromLogitsParams p = kl_from_logits_params(logits, ref_logits, c10::nullopt, temperature, op, t.a, t.b);
  p.vocab_start = vocab_start;
  p.state = state.data_ptr<float>();
  p.chunks = chunks;
  p.finish = finish;
  return p;
}

}  // namespace rlk
