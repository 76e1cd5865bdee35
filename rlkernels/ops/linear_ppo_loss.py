"""rlkernels.linear_ppo_loss: from the last hidden states and the lm-head straight to
the PPO/GRPO loss, never holding the [N, V] logits.

linear_logprobs (token-chunked lm-head with fused log-softmax rows, recomputing
each chunk in backward) gives the per-token log-probs and entropies; the fused
policy_loss op turns them into the clipped surrogate plus the KL term with its
gradient; an entropy bonus is aggregated like the loss.  Backward flows through
the same chunks to hidden, weight (and bias)."""
from __future__ import annotations

import torch

from .. import _validate as V
from ..reference.losses import KL_ESTIMATORS, aggregate
from . import _losses
from .linear_logprobs import linear_logprobs
from .policy_loss import _policy


def linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor | None = None, *,
                    ref_logprobs: torch.Tensor | None = None, beta: float = 0.0, kl: str = "k3",
                    entropy_coef: float = 0.0, temperature: float = 1.0, bias: torch.Tensor | None = None,
                    clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                    log_ratio_clamp: float | None = 20.0, agg: str = "token-mean", num_tokens: float | None = None,
                    num_seqs: float | None = None, norm_length: float | None = None,
                    weights: torch.Tensor | None = None, ignore_index: int = -100, chunk_size: int | None = None,
                    backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """The loss of ppo_loss (all its options) on logprobs = log softmax((hidden @ weight.T
    + bias) / temperature)[labels], plus ``beta * KL(pi || pi_ref)`` per token (k1/k2/k3 as
    in grpo_loss, needs ref_logprobs) minus ``entropy_coef * agg(entropy)`` (the entropy
    bonus aggregated with the same `agg` and normalisers)::

        loss = agg(weights * L_clip + beta * KL) - entropy_coef * agg(entropy)

    hidden `[B, T, H]`, weight `[V, H]` (the lm-head), labels `[B, T]` (the sampled
    tokens), old_logprobs / advantages / mask / ref_logprobs / weights as in ppo_loss.
    Masked tokens (and labels equal to ignore_index) skip the lm-head entirely.  At most
    `chunk_size` tokens of logits exist at a time (default: 64 MiB of float32).
    Gradients flow to hidden, weight and bias.  Returns (loss, stats): ppo_loss's stats
    plus "entropy" (mean over valid tokens).
    """
    op = linear_ppo_loss.__name__
    V.tensor(op, "hidden", hidden, ndim=3)
    beta = V.number(op, "beta", beta, low=0.0)
    entropy_coef = V.number(op, "entropy_coef", entropy_coef)
    V.choice(op, "kl", kl, KL_ESTIMATORS)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"{op}: beta > 0 needs ref_logprobs")
    V.tensor(op, "labels", labels, ndim=2)
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{op}: labels must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    valid = V.binary_mask(op, "mask", mask, labels.shape, hidden.device)
    if valid is not None:
        # Masked tokens need no logits: give them the ignored label.
        labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    valid = labels != ignore_index
    with_entropy = entropy_coef != 0.0
    out = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
                          entropy=with_entropy, chunk_size=chunk_size, backend=backend)
    logprobs, entropy = out if with_entropy else (out, None)
    loss, stats = _policy(op, logprobs, old_logprobs, advantages, valid, weights=weights,
                          ref_logprobs=ref_logprobs if beta > 0 else None, clip_low=clip_low, clip_high=clip_high,
                          dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, kl_coef=beta,
                          kl=kl if beta > 0 else "none", agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                          norm_length=norm_length, backend=backend)
    if with_entropy:
        num_tokens, num_seqs, norm_length = _losses.normalisers(op, agg, num_tokens, num_seqs, norm_length)
        entropy = torch.where(valid, entropy, 0)
        loss = loss - entropy_coef * aggregate(entropy, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                               norm_length=norm_length)
        count = valid.sum()
        stats["entropy"] = torch.where(count > 0, entropy.detach().sum() / count.clamp(min=1), 0)
    return loss, stats
