"""Pure-PyTorch definitions of every rlkernels op: the truth that tests and
benchmarks compare against, and the `backend="reference"` path."""
from .gae import discounted_returns, gae
from .group_advantages import group_advantages
from .kl_from_logits import kl_from_logits
from .kl_penalty import kl_penalty
from .logprobs import linear_logprobs, logprobs, logprobs_per_row, logprobs_vocab_tile
from .masked import masked_mean, masked_whiten
from .multi_tensor import gossip_mix, pack_tensors, unpack_tensors
from .policy_loss import grpo_loss, ppo_loss
from .preference import dpo_loss, sequence_logprobs
from .value_loss import value_loss

__all__ = [
    "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
    "logprobs", "logprobs_per_row", "logprobs_vocab_tile", "linear_logprobs", "kl_from_logits", "kl_penalty",
    "ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs",
    "pack_tensors", "unpack_tensors", "gossip_mix",
]
