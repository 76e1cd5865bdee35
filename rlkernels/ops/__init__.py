"""One public function per op; each validates its arguments, picks a backend and
registers the fake kernel (and autograd where the op has a gradient)."""
from .discounted_returns import discounted_returns
from .dpo_loss import dpo_loss
from .gae import gae
from .group_advantages import group_advantages
from .kl_from_logits import kl_from_logits
from .kl_penalty import kl_penalty
from .linear_logprobs import linear_logprobs
from .linear_ppo_loss import linear_ppo_loss
from .logprobs import logprobs
from .masked import masked_mean, masked_whiten
from .multi_tensor import gossip_mix, pack_tensors, unpack_tensors
from .policy_loss import grpo_loss, ppo_loss
from .sequence_logprobs import sequence_logprobs
from .value_loss import value_loss

__all__ = [
    "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
    "logprobs", "linear_logprobs", "kl_from_logits", "kl_penalty",
    "ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs", "linear_ppo_loss",
    "pack_tensors", "unpack_tensors", "gossip_mix",
]
