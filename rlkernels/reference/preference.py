"""TRL's preference losses (DPO and its variants) and masked per-sequence log-prob
sums, in plain PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dtypes import acc_dtype
from ._token_loss import _valid

__all__ = ["dpo_loss", "dpo_sequence_loss", "sequence_logprobs"]

PREFERENCE_KINDS = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's DPOTrainer.dpo_loss for loss_type sigmoid / ipo / hinge / robust on summed
    sequence log-probs; returns (per-pair losses, chosen_rewards, rejected_rewards)."""
    acc = acc_dtype(policy_chosen.dtype)
    pc, pr, rc, rr = (t.to(acc) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    logits = (pc - pr) - (rc - rr)
    ls = label_smoothing
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif kind == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif kind == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown kind {kind!r}")
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor | None = None, *,
                      average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean, 0 for an empty row) of the valid token log-probs."""
    acc = acc_dtype(token_logprobs.dtype)
    valid = _valid(mask, token_logprobs)
    sums = torch.where(valid, token_logprobs.to(acc), token_logprobs.new_zeros((), dtype=acc)).sum(-1)
    if not average:
        return sums
    counts = valid.sum(-1).to(acc)
    return torch.where(counts > 0, sums / counts.clamp(min=1), 0)


def dpo_sequence_loss(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None,
                      *, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
                      average: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dpo_loss of the per-sequence log-probs of [2B, T] token log-probs, chosen rows
    then rejected rows (TRL's concatenated layout)."""
    B = policy_logprobs.shape[0] // 2
    policy = sequence_logprobs(policy_logprobs, mask, average=average)
    ref = sequence_logprobs(ref_logprobs, mask, average=average)
    return dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta=beta, kind=kind, label_smoothing=label_smoothing)
