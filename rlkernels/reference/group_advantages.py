"""Group-normalised advantages (GRPO, Dr. GRPO, RLOO) in plain PyTorch."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype

__all__ = ["group_advantages"]

BASELINES = ("mean", "loo")
SCALES = ("group", "batch", "none")


def group_advantages(scores: torch.Tensor, group_size: int | None = None, group_index: torch.Tensor | None = None,
                     *, num_groups: int | None = None, baseline: str = "mean", scale: str = "group",
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: (s - mean_g) / (std_g + eps) with the unbiased group std; Dr. GRPO:
    scale="none"; RLOO: baseline="loo" (s - mean of the others = n/(n-1) (s - mean_g));
    scale="batch" divides by the std of all scores (TRL's scale_rewards="batch").
    A group of one gets advantage 0.  Also returns, per group, whether all its
    scores are equal (zero-variance groups that trainers may skip)."""
    s = scores.to(acc_dtype(scores.dtype))
    N = s.shape[0]
    if group_index is None:
        idx = torch.arange(N, device=s.device) // group_size
        G = N // group_size
    else:
        idx = group_index.long()
        G = num_groups if num_groups is not None else (int(idx.max()) + 1 if N else 0)
    zeros = s.new_zeros(G)
    count = zeros.index_add(0, idx, torch.ones_like(s))
    mean = zeros.index_add(0, idx, s) / count.clamp(min=1)
    dev = s - mean[idx]
    sq = zeros.index_add(0, idx, dev * dev)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), zeros)
    n = count[idx]
    centred = dev * n / (n - 1).clamp(min=1) if baseline == "loo" else dev
    if scale == "group":
        centred = centred / (std[idx] + eps)
    elif scale == "batch":
        batch_std = s.std() if N > 1 else s.new_zeros(())
        centred = centred / (batch_std + eps)
    advantages = torch.where(n > 1, centred, torch.zeros_like(centred))
    lo = s.new_full((G,), float("inf")).scatter_reduce(0, idx, s, "amin")
    hi = s.new_full((G,), -float("inf")).scatter_reduce(0, idx, s, "amax")
    # equal and finite (a group of +-inf scores has NaN advantages); NaN is never equal
    return advantages, (count == 0) | ((lo == hi) & lo.isfinite())
