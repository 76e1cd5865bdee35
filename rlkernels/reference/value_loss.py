"""verl's (clipped) value loss composed from PyTorch ops; masked slots are selected
away before any arithmetic."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from ._token_loss import _masked_mean, _valid, aggregate

__all__ = ["value_loss"]

VALUE_STATS = ("clip_frac", "num_tokens")


def value_loss(values: torch.Tensor, old_values: torch.Tensor | None, returns: torch.Tensor,
               mask: torch.Tensor | None = None, *, clip: float | None = None, agg: str = "token-mean",
               num_tokens: float | None = None, num_seqs: float | None = None,
               norm_length: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's compute_value_loss: 0.5 max((v - R)^2, (old + clamp(v - old, +-clip) - R)^2);
    clip_frac counts tokens where the clamp acts and the clipped term is the larger.
    Only `values` is differentiated: old_values and returns are data (detached)."""
    returns = returns.detach()
    old_values = old_values.detach() if old_values is not None else None
    acc = acc_dtype(values.dtype)
    valid = _valid(mask, values)
    zero = values.new_zeros((), dtype=acc)
    v = torch.where(valid, values.to(acc), zero)
    ret = torch.where(valid, returns.to(acc), zero)
    losses1 = (v - ret).square()
    clipped = torch.zeros_like(valid)
    if clip is not None:
        old = torch.where(valid, old_values.to(acc), zero)
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        losses2 = (v_clipped - ret).square()
        # verl's vf_clipfrac compares the two terms; inside [-clip, clip] they are equal
        # in exact arithmetic, so only tokens where the clamp acts count.
        clipped = (losses2 > losses1) & ((v - old).abs() > clip)
        losses1 = torch.maximum(losses1, losses2)
    loss_mat = torch.where(valid, 0.5 * losses1, zero)
    loss = aggregate(loss_mat, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    with torch.no_grad():
        count = valid.sum().to(acc)
        stats = {"clip_frac": _masked_mean(clipped.to(acc), valid, count), "num_tokens": count}
    return loss, stats
