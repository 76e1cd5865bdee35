"""PPO's and GRPO's clipped surrogate losses composed from PyTorch ops, written
the way verl and TRL write them: the truth for tests and benchmarks and the
`backend="reference"` path.  Gradients come from autograd.

Masked slots are selected away (`torch.where`) before any arithmetic, so NaN or inf
there reaches neither the loss nor the gradient."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from ._token_loss import _masked_mean, _valid, aggregate

__all__ = ["ppo_loss", "grpo_loss"]

KL_ESTIMATORS = ("k1", "k2", "k3")
POLICY_STATS = ("clip_frac_upper", "clip_frac_lower", "clip_frac_dual", "approx_kl_k1", "approx_kl_k3",
                "ratio_mean", "ratio_max", "kl", "num_tokens")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Estimators of KL(pi || pi_ref) from samples of pi: k1 = lp - ref, k2 = (lp - ref)^2 / 2,
    k3 = exp(ref - lp) - (ref - lp) - 1 (TRL's and verl's, without verl's clamps)."""
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        delta = ref_logprobs - logprobs
        return torch.exp(delta) - delta - 1
    raise ValueError(f"unknown kl estimator {kind!r}")


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor | None = None, *, clip_low: float = 0.2, clip_high: float | None = None,
             dual_clip: float | None = None, log_ratio_clamp: float | None = 20.0, agg: str = "token-mean",
             num_tokens: float | None = None, num_seqs: float | None = None, norm_length: float | None = None,
             weights: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
             kl_coef: float = 0.0, kl: str = "k3") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's compute_policy_loss (vanilla, with dual clip) plus TRL's KL term:

    ratio = exp(clamp(lp - old, +-log_ratio_clamp)); L = max(-A ratio, -A clip(ratio, 1-cl, 1+ch));
    dual clip for A < 0: L = min(L, -A dual_clip); L = weights L + kl_coef KL(lp, ref).
    Only `logprobs` is differentiated: the others are data (detached, as the kernels treat them)."""
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    weights = weights.detach() if weights is not None else None
    ref_logprobs = ref_logprobs.detach() if ref_logprobs is not None else None
    clip_high = clip_low if clip_high is None else clip_high
    acc = acc_dtype(logprobs.dtype)
    valid = _valid(mask, logprobs)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    zero = logprobs.new_zeros((), dtype=acc)
    lp = torch.where(valid, logprobs.to(acc), zero)
    old = torch.where(valid, old_logprobs.to(acc), zero)
    adv = torch.where(valid, advantages.to(acc), zero)
    log_ratio = lp - old
    if log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss_mat = torch.maximum(pg_losses1, pg_losses2)
    dual_hit = torch.zeros_like(valid)
    if dual_clip is not None:
        pg_losses3 = -adv * dual_clip
        negative = adv < 0
        dual_hit = negative & (loss_mat > pg_losses3)
        loss_mat = torch.where(negative, torch.minimum(loss_mat, pg_losses3), loss_mat)
    if weights is not None:
        loss_mat = loss_mat * torch.where(valid, weights.to(acc), zero)
    kl_mat = torch.zeros_like(lp)
    if kl_coef != 0.0 or ref_logprobs is not None:
        if ref_logprobs is not None:
            ref = torch.where(valid, ref_logprobs.to(acc), zero)
            kl_mat = kl_estimate(lp, ref, kl)
            loss_mat = loss_mat + kl_coef * kl_mat
    loss_mat = torch.where(valid, loss_mat, zero)
    loss = aggregate(loss_mat, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    with torch.no_grad():
        count = valid.sum().to(acc)
        ratio_d = ratio.detach()
        stats = {
            "clip_frac_upper": _masked_mean(((adv > 0) & (ratio_d > 1 + clip_high)).to(acc), valid, count),
            "clip_frac_lower": _masked_mean(((adv < 0) & (ratio_d < 1 - clip_low)).to(acc), valid, count),
            "clip_frac_dual": _masked_mean(dual_hit.to(acc), valid, count),
            "approx_kl_k1": _masked_mean(-log_ratio.detach(), valid, count),
            "approx_kl_k3": _masked_mean(ratio_d - 1 - log_ratio.detach(), valid, count),
            "ratio_mean": _masked_mean(ratio_d, valid, count),
            "ratio_max": torch.where(valid, ratio_d, zero).max() if valid.numel() else zero,
            "kl": _masked_mean(kl_mat.detach(), valid, count),
            "num_tokens": count,
        }
    return loss, stats


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_aggregation(loss_type: str, batch: int, row_length: int, *, max_completion_length: int | None = None,
                     num_tokens: float | None = None, num_seqs: float | None = None) -> dict:
    """TRL's GRPO normalisations as agg arguments (TRL's extra division by the gradient
    accumulation steps is left to the trainer):
      grpo    mean over the B rows of (row sum / max(row tokens, 1))   -> seq-mean-token-mean, n_s = B
      bnpo    sum / max(valid tokens, 1)                              -> token-mean
      dr_grpo sum / (B * max_completion_length)                       -> seq-mean-token-sum-norm, n_s = B
      dapo    sum / num_items_in_batch (global tokens per process)    -> token-mean, n_t = num_tokens"""
    # An empty batch (B = 0 or T = 0) keeps the counted normalisers (0, so the loss is 0):
    # B or T as a normaliser would be an invalid num_seqs / norm_length of 0.
    seqs = (float(batch) if batch > 0 else None) if num_seqs is None else num_seqs
    if loss_type == "grpo":
        return dict(agg="seq-mean-token-mean", num_seqs=seqs)
    if loss_type == "bnpo":
        return dict(agg="token-mean")
    if loss_type == "dr_grpo":
        length = row_length if max_completion_length is None else max_completion_length
        return dict(agg="seq-mean-token-sum-norm", num_seqs=seqs, norm_length=float(length) if length > 0 else None)
    if loss_type == "dapo":
        return dict(agg="token-mean", num_tokens=num_tokens)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor | None = None, *, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
              kl: str = "k3", loss_type: str = "grpo", clip_low: float = 0.2, clip_high: float | None = None,
              max_completion_length: int | None = None, num_tokens: float | None = None,
              num_seqs: float | None = None, log_ratio_clamp: float | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's GRPOTrainer loss: -min(ratio A, clip(ratio) A) + beta KL, normalised per loss_type."""
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    norm = grpo_aggregation(loss_type, logprobs.shape[0], logprobs.shape[1],
                            max_completion_length=max_completion_length, num_tokens=num_tokens, num_seqs=num_seqs)
    return ppo_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                    log_ratio_clamp=log_ratio_clamp, ref_logprobs=ref_logprobs if beta != 0.0 else None,
                    kl_coef=beta, kl=kl, **norm)
