"""Log-probs, entropy and KL over a vocabulary sharded across the ranks of a
tensor-parallel group (Megatron-style: rank r holds the columns [v0_r, v0_r + V_r)
of the logits, or the rows of the lm-head weight).

Each rank reduces its own shard to per-token softmax statistics with the ops'
vocabulary-tile kernels, the ranks exchange those statistics in one all_gather,
and every rank merges them in rank order (float64), so every rank gets the same
result: the op on the full vocabulary.  Per token and rank the message holds

- log-probs: (max, sum 2^y, sum y 2^y, label logit, label owned), 5 float32 = 20 bytes;
- KL: (max_p, sum_p, centred log-ratio sum, max_q, sum_q), 5 float32 = 20 bytes,

against V_r x 2 bytes a token for all-gathering bf16 logits.  The backward needs no
communication for the logits ops (each rank's gradient depends on its own columns
and the merged row statistics); the lm-head op all-reduces the [N, H] hidden
gradient, the sum of every shard's contribution (which a Megatron column-parallel
layer does in its own backward when `reduce_hidden_grad=False`).

Before the exchange, with check=True (the default), the ranks compare an 8-value
header (token count, dtype, shard size, settings, label range and checksum) in one
small all_gather: a mismatch raises VocabParallelMismatchError on every rank before
any statistics move.  With check=False and `vocab_start=` given, a call makes exactly
one collective; check=False without vocab_start still exchanges the shard sizes.
A peer that exits or stalls past `timeout` raises VocabParallelError on every live
rank; outputs are fresh tensors, so nothing is half-written.

exact=True (every op, CPU tensors, every shard starting on a multiple of VOCAB_CHUNK
columns): each rank sends its chunks' statistics instead, CHUNK_STAT_WIDTH float32 a
chunk of the widest shard and token (KL_CHUNK_STAT_WIDTH for KL), and every rank folds
all chunks in vocabulary order with the compiled fold of the unsharded kernel, whose
bits it then gets (docs/distributed.md).  The header is then always exchanged: it
carries the shard sizes."""
from ._comm import VocabParallelError, VocabParallelMismatchError
from ._ops import kl_from_logits, linear_logprobs, linear_ppo_loss, logprobs, traffic_bytes
from ._stats import (CHUNK_STAT_WIDTH, KL_CHUNK_STAT_WIDTH, STAT_WIDTH, VOCAB_CHUNK, merge_kl_stats,
                     merge_softmax_stats)

__all__ = ["logprobs", "kl_from_logits", "linear_logprobs", "linear_ppo_loss", "VocabParallelError",
           "VocabParallelMismatchError", "STAT_WIDTH", "CHUNK_STAT_WIDTH", "KL_CHUNK_STAT_WIDTH", "VOCAB_CHUNK",
           "traffic_bytes", "merge_softmax_stats", "merge_kl_stats"]
