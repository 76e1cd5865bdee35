"""One public function per op; each validates its arguments, picks a backend and
runs the op's kernel.  Fake kernels and autograd are registered once per op, for
the compiled op and its Triton twin alike (see _registry.py)."""
from .gae import discounted_returns, gae
from .group_advantages import group_advantages
from .kl_from_logits import kl_from_logits
from .kl_penalty import kl_penalty
from .linear_logprobs import linear_logprobs
from .linear_ppo_loss import linear_ppo_loss
from .logprobs import logprobs
from .masked import masked_mean, masked_whiten
from .multi_tensor import gossip_mix, pack_tensors, unpack_tensors
from .policy_loss import grpo_loss, ppo_loss
from .preference import dpo_loss, sequence_logprobs
from .value_loss import value_loss

__all__ = [
    "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
    "logprobs", "linear_logprobs", "kl_from_logits", "kl_penalty",
    "ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs", "linear_ppo_loss",
    "pack_tensors", "unpack_tensors", "gossip_mix",
]
