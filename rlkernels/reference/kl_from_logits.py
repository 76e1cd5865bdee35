"""Full-vocabulary KL(pi || pi_ref) from both models' logits, written with two
`log_softmax` calls; accumulates in float32 (float64 stays float64)."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from .logprobs import _scaled

__all__ = ["kl_from_logits"]


def kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(pi || pi_ref) = sum_j p_j (log p_j - log q_j) per token, p = softmax(logits / T),
    q = softmax(ref_logits / T); 0 where mask is False.  KL is inf wherever the reference
    rules out (logit -inf) a token the policy can sample (finite logit), however small
    that token's p_j (which may underflow to 0 in floating point); NaN where it rules out
    every token (no distribution)."""
    acc = acc_dtype(logits.dtype)
    if mask is not None:
        keep = mask.bool().unsqueeze(-1)
        logits, ref_logits = torch.where(keep, logits, 0), torch.where(keep, ref_logits, 0)
    logp = torch.log_softmax(_scaled(logits.to(acc), temperature), dim=-1)
    logq = torch.log_softmax(_scaled(ref_logits.to(acc), temperature), dim=-1)
    p = logp.exp()
    kl = (p * (logp - logq).masked_fill(p == 0, 0)).sum(-1)
    ruled_out = ((logits > -torch.inf) & (ref_logits == -torch.inf)).any(-1) & (ref_logits > -torch.inf).any(-1)
    kl = torch.where(ruled_out, torch.inf, kl)
    return kl if mask is None else torch.where(mask.bool(), kl, 0)
