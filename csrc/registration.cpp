// Every rlkernels schema, in one place.  Backends add implementations with
// TORCH_LIBRARY_IMPL in their own files; the Triton twins (rlkernels::<op>_triton)
// take these schemas in rlkernels/ops/_registry.py.
#include <torch/library.h>

TORCH_LIBRARY(rlkernels, m) {
  // Advantage estimators (forward only: advantages are constants in training).
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? dones, Tensor? last_values, "
        "float gamma, float lam) -> (Tensor advantages, Tensor returns)");
  m.def("discounted_returns(Tensor rewards, Tensor? mask, Tensor? dones, float gamma) -> Tensor");
  // baseline: 0 mean, 1 leave-one-out; scale: 0 group std, 1 batch std, 2 none.  num_groups is a
  // SymInt: it follows the batch size, which torch.compile(dynamic=True) keeps symbolic.
  m.def("group_advantages(Tensor scores, Tensor? group_index, int group_size, SymInt num_groups, "
        "int baseline, int scale, float eps) -> (Tensor advantages, Tensor all_equal)");
  m.def("masked_row_mean(Tensor x, Tensor? mask) -> Tensor");
  m.def("masked_whiten(Tensor x, Tensor? mask, bool shift_mean, float eps) -> Tensor");

  // Token-level losses.  One fused pass returns the loss, its
  // statistics, the per-token gradient before aggregation (empty unless
  // need_grad) and the per-row gradient scales; backward only rescales.
  // Scalars travel in one list (each schema argument costs the Triton twins'
  // Python autograd wrapper microseconds per call; the compiled ops' autograd is
  // C++, csrc/autograd); its order is written where the list is read,
  // csrc/args/policy_loss.h and csrc/args/value_loss.h.
  m.def("policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor? mask, Tensor? weights, "
        "Tensor? ref_logprobs, float[] coefficients, str kl, str agg, bool need_grad) "
        "-> (Tensor loss, Tensor stats, Tensor grad, Tensor row_scale)");
  m.def("value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor? mask, float[] coefficients, str agg, "
        "bool need_grad) -> (Tensor loss, Tensor stats, Tensor grad, Tensor row_scale)");
  // Their backward: grad[b, t] * grad_loss * row_scale[b], in `dtype`.
  m.def("scale_rows(Tensor grad, Tensor row_scale, Tensor grad_loss, ScalarType dtype) -> Tensor");
  // linear_ppo_loss' sweep (csrc/lm_head/linear_policy_loss.cpp): the loss, its stats
  // (policy_loss' and the entropy mean) and the gradients of hidden, weight and bias for
  // d loss = 1 (empty where `needs` is False), which its backward scales.  pieces:
  // "counted", "counted-valid" or "device" (rlkernels/ops/_ppo_pieces.py).
  m.def("linear_policy_loss(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, Tensor old_logprobs, "
        "Tensor advantages, Tensor valid, Tensor? weights, Tensor? ref_logprobs, float[] coefficients, str kl, "
        "str agg, float entropy_coef, float temperature, int ignore_index, int chunk, str backend, bool[] needs, "
        "str pieces) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Preference losses over per-sequence log-probs; dlogits (d loss / d z per
  // pair) is saved for backward.  sequence_logprobs: masked per-row sums (or
  // means with average) and the rows' valid-token counts.
  m.def("dpo_loss(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, "
        "float beta, str kind, float label_smoothing) "
        "-> (Tensor losses, Tensor chosen_rewards, Tensor rejected_rewards, Tensor dlogits)");
  // The whole DPO step from token log-probs, [2B, T] chosen rows then rejected rows
  // (TRL's concatenated layout): both masked sums, the pair loss and coef, the [2B]
  // per-row d loss / d policy token (reference: its negative); the backward writes
  // scale * grad_losses[r mod B] * coef[r] on valid tokens (scale -1: the reference's).
  m.def("dpo_sequence_loss(Tensor policy_logprobs, Tensor ref_logprobs, Tensor? mask, float beta, str kind, "
        "float label_smoothing, bool average) "
        "-> (Tensor losses, Tensor chosen_rewards, Tensor rejected_rewards, Tensor coef)");
  m.def("dpo_sequence_loss_backward(Tensor grad_losses, Tensor? mask, Tensor coef, float scale, int T, "
        "ScalarType dtype) -> Tensor");
  m.def("sequence_logprobs(Tensor token_logprobs, Tensor? mask, bool average) -> (Tensor logprobs, Tensor num_tokens)");
  m.def("sequence_logprobs_backward(Tensor grad, Tensor? mask, Tensor num_tokens, bool average, int T, "
        "ScalarType dtype) -> Tensor");
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
  // One vocabulary tile [vocab_start, vocab_start + V') of rows whose logits arrive in
  // tiles (linear_logprobs): `state` (float32, 4 per row) carries the running
  // statistics and holds (logprob, entropy, max, log-sum-exp) after the tile with finish.
  m.def("logprobs_vocab_tile(Tensor logits, Tensor labels, Tensor(a!) state, float temperature, int ignore_index, "
        "int vocab_start, bool with_entropy, bool finish) -> ()");
  // Log-probs (and entropy) straight from hidden states and the lm-head, the [N, V] logits
  // one tile at a time (csrc/lm_head/linear_logprobs.cpp).  hidden [..., H], labels [...]
  // (N tokens); outputs of labels' shape: log-probs, entropies ([0] without with_entropy),
  // the row statistics the backward keeps ([N, 2]) and is_top1 ([0] without with_top1).  tile_tokens/tile_vocab 0:
  // from the budget (csrc/core/lm_head.h); drop_ignored: the op may read the labels on the
  // host to drop ignored rows (rlkernels._checkmode.reads_data); backend: the tile kernels'
  // ("cpu", "cuda" or "triton").  The backward recomputes the tiles (its autograd hands it
  // the forward's where they fit the budget).
  m.def("linear_logprobs(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, float temperature, "
        "int ignore_index, bool with_entropy, bool with_top1, int tile_tokens, int tile_vocab, int budget, "
        "bool drop_ignored, str backend) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor labels, Tensor? bias, Tensor saved, Tensor entropies, float temperature, int ignore_index, "
        "int tile_tokens, int tile_vocab, int budget, bool drop_ignored, str backend, bool needs_hidden, "
        "bool needs_weight, bool needs_bias) -> (Tensor, Tensor, Tensor)");
  m.def("kl_from_logits(Tensor logits, Tensor ref_logits, Tensor? mask, float temperature) "
        "-> (Tensor kl, Tensor saved)");
  m.def("kl_from_logits_backward(Tensor grad_kl, Tensor logits, Tensor ref_logits, Tensor? mask, "
        "Tensor saved, float temperature, bool logits_grad, bool ref_grad) -> (Tensor, Tensor)");
  // KL's chunk rule in pieces (the vocabulary-parallel exact mode): a tile
  // [vocab_start, vocab_start + V') of both rows writes its chunks' statistics into
  // `state` (float32 [..., C, 6], a slot per vocabulary chunk); with finish the slots are
  // folded and the first holds (KL, saved) (csrc/core/kl_from_logits.h).
  m.def("kl_vocab_tile(Tensor logits, Tensor ref_logits, Tensor(a!) state, float temperature, int vocab_start, "
        "bool finish) -> ()");
  m.def("kl_penalty(Tensor logprobs, Tensor ref_logprobs, str kind, float clamp) -> (Tensor value, Tensor slope)");

  // Parameter averaging (rlkernels.distributed): many tensors <-> one flat
  // bucket with an optional scale and dtype cast, and one gossip mixing step
  // out = w_self * x + w_left * left + w_right * right (out may alias x).
  m.def("pack_tensors(Tensor[] tensors, Tensor(a!) bucket, float scale) -> ()");
  m.def("unpack_tensors(Tensor bucket, Tensor(a!)[] tensors, float scale) -> ()");
  m.def("gossip_mix(Tensor x, Tensor left, Tensor right, float w_self, float w_left, float w_right, "
        "Tensor(a!) out) -> ()");
}
