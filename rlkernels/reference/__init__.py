"""Pure-PyTorch definitions of every rlkernels op: the truth that tests and
benchmarks compare against, and the `backend="reference"` path."""
from .advantages import discounted_returns, gae
from .group import group_advantages, masked_mean, masked_whiten
from .losses import dpo_loss, grpo_loss, ppo_loss, sequence_logprobs, value_loss

__all__ = ["gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten"]
__all__ += ["ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs"]
from .logprobs import kl_from_logits, kl_penalty, linear_logprobs, logprobs, logprobs_per_row  # noqa: E402

__all__ += ["logprobs", "logprobs_per_row", "kl_from_logits", "kl_penalty", "linear_logprobs"]
