// Every rlkernels schema, in one place.  Backends add implementations with
// TORCH_LIBRARY_IMPL in their own files; Triton kernels register from Python
// as rlkernels::<op>_triton.
#include <torch/library.h>

TORCH_LIBRARY(rlkernels, m) {
  // Advantage estimators (forward only: advantages are constants in training).
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? dones, Tensor? last_values, "
        "float gamma, float lam) -> (Tensor advantages, Tensor returns)");
  m.def("discounted_returns(Tensor rewards, Tensor? mask, Tensor? dones, float gamma) -> Tensor");
  // baseline: 0 mean, 1 leave-one-out; scale: 0 group std, 1 batch std, 2 none.
  m.def("group_advantages(Tensor scores, Tensor? group_index, int group_size, int num_groups, "
        "int baseline, int scale, float eps) -> (Tensor advantages, Tensor all_equal)");
  m.def("masked_row_mean(Tensor x, Tensor? mask) -> Tensor");
  m.def("masked_whiten(Tensor x, Tensor? mask, bool shift_mean, float eps) -> Tensor");

  // Log-probs, entropy and KL from logits (docs/logprobs.md).  `saved` holds per-row
  // softmax statistics for the backward: [..., 2] for logprobs, [..., 5] for KL.
  m.def("logprobs(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool with_entropy, bool inplace_backward) -> (Tensor logprobs, Tensor entropy, Tensor saved)");
  // The backwards also take a vocabulary tile: logits holding the columns
  // [vocab_start, vocab_start + V') of the rows whose statistics `saved` holds.
  m.def("logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor saved, Tensor entropy, float temperature, int ignore_index, int vocab_start=0) -> Tensor");
  m.def("logprobs_backward_inplace(Tensor grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, Tensor labels, "
        "Tensor saved, Tensor entropy, float temperature, int ignore_index, int vocab_start=0) -> ()");
  m.def("kl_from_logits(Tensor logits, Tensor ref_logits, Tensor? mask, float temperature) "
        "-> (Tensor kl, Tensor saved)");
  m.def("kl_from_logits_backward(Tensor grad_kl, Tensor logits, Tensor ref_logits, Tensor? mask, "
        "Tensor saved, float temperature, bool logits_grad, bool ref_grad) -> (Tensor, Tensor)");
  m.def("kl_penalty(Tensor logprobs, Tensor ref_logprobs, str kind, float clamp) -> (Tensor value, Tensor slope)");
}
