"""Masked statistics (mean, whitening) in plain PyTorch."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype

__all__ = ["masked_mean", "masked_whiten"]

def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None,
                keepdim: bool = False) -> torch.Tensor:
    """Mean over the entries where mask is 1 (selected, so masked NaN never enters);
    0 where nothing is valid."""
    acc = x.to(acc_dtype(x.dtype))
    if mask is None:
        mask = torch.ones_like(acc, dtype=torch.bool)
    mask = mask.bool()
    total = torch.where(mask, acc, torch.zeros_like(acc))
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    count = mask.sum(dim=dims, keepdim=keepdim)
    total = total.sum(dim=dims, keepdim=keepdim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid entries, unbiased variance (as TRL
    and verl); shift_mean=False adds the mean back.  Masked entries become 0."""
    acc = x.to(acc_dtype(x.dtype))
    if mask is None:
        mask = torch.ones_like(acc, dtype=torch.bool)
    mask = mask.bool()
    zero = torch.zeros_like(acc)
    count = mask.sum()
    mean = torch.where(mask, acc, zero).sum() / count.clamp(min=1)
    sq = torch.where(mask, (acc - mean) ** 2, zero).sum()
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), sq.new_zeros(()))
    out = (acc - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)
