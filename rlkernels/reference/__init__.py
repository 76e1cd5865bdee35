"""Pure-PyTorch definitions of every rlkernels op: the truth that tests and
benchmarks compare against, and the `backend="reference"` path."""
from .advantages import discounted_returns, gae
from .group import group_advantages, masked_mean, masked_whiten
from .logprobs import kl_from_logits, kl_penalty, linear_logprobs, logprobs, logprobs_per_row, logprobs_vocab_tile
from .losses import dpo_loss, grpo_loss, ppo_loss, sequence_logprobs, value_loss
from .multi_tensor import gossip_mix, pack_tensors, unpack_tensors

__all__ = [
    "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
    "logprobs", "logprobs_per_row", "logprobs_vocab_tile", "linear_logprobs", "kl_from_logits", "kl_penalty",
    "ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs",
    "pack_tensors", "unpack_tensors", "gossip_mix",
]
