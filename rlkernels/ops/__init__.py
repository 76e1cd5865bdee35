"""One public function per op; each validates its arguments, picks a backend and
registers the fake kernel (and autograd where the op has a gradient)."""
from .discounted_returns import discounted_returns
from .gae import gae
from .group_advantages import group_advantages
from .masked import masked_mean, masked_whiten
from .policy_loss import grpo_loss, ppo_loss
from .value_loss import value_loss
from .dpo_loss import dpo_loss
from .sequence_logprobs import sequence_logprobs

from .kl_from_logits import kl_from_logits
from .kl_penalty import kl_penalty
from .linear_logprobs import linear_logprobs
from .logprobs import logprobs
from .linear_ppo_loss import linear_ppo_loss

__all__ = ["gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten"]
__all__ += ["ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs"]
__all__ += ["logprobs", "kl_from_logits", "kl_penalty", "linear_logprobs"]
__all__ += ["linear_ppo_loss"]
