"""What the token-level reference losses share: the aggregation modes over a
[B, T] mask and masked means."""
from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask.bool()


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor | None, agg: str = "token-mean", *,
              num_tokens: float | None = None, num_seqs: float | None = None,
              norm_length: float | None = None) -> torch.Tensor:
    """Reduces a [B, T] per-token loss (already 0 in masked slots) to a scalar.

    n_t = num_tokens or the number of valid tokens; n_s = num_seqs or the number of
    rows with a valid token; T_norm = norm_length or T.  A zero normaliser gives 0."""
    valid = _valid(mask, loss_mat)
    row_tokens = valid.sum(-1).to(loss_mat.dtype)
    row_sums = loss_mat.sum(-1)
    n_t = row_tokens.sum() if num_tokens is None else loss_mat.new_tensor(float(num_tokens))
    n_s = (row_tokens > 0).sum().to(loss_mat.dtype) if num_seqs is None else loss_mat.new_tensor(float(num_seqs))
    t_norm = loss_mat.new_tensor(float(loss_mat.shape[-1] if norm_length is None else norm_length))

    def safe_div(num, den):
        return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)

    if agg == "token-mean":
        return safe_div(row_sums.sum(), n_t)
    if agg == "token-sum":
        return row_sums.sum()
    if agg == "seq-mean-token-sum":
        return safe_div(row_sums.sum(), n_s)
    if agg == "seq-mean-token-mean":
        return safe_div(safe_div(row_sums, row_tokens).sum(), n_s)
    if agg == "seq-mean-token-sum-norm":
        return safe_div(row_sums.sum(), n_s * t_norm)
    raise ValueError(f"unknown agg {agg!r}")


def _masked_mean(x: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    total = torch.where(valid, x, 0).sum()
    return torch.where(count > 0, total / count.clamp(min=1), 0)
