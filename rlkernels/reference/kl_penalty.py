"""verl's KL penalty estimators on per-token log-probs, in plain PyTorch."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype

__all__ = ["kl_penalty"]


class _StraightThrough(torch.autograd.Function):
    """`value` forward, k2's gradient r = logprob - ref_logprob backward (and k2's
    curvature 1 in a double backward: the backward is a differentiable product)."""

    @staticmethod
    def forward(ctx, value, r):
        ctx.save_for_backward(r)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return None, grad * r


KL_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs", "k1+", "k3+")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1", *,
               clamp: float | None = None) -> torch.Tensor:
    """verl's kl_penalty estimators, written as verl writes them (core_algos.kl_penalty).
    `clamp` bounds the value to [-clamp, clamp]; None means the kind's default (10 for
    k3/low_var_kl, none otherwise)."""
    acc = acc_dtype(torch.promote_types(logprobs.dtype, ref_logprobs.dtype))
    logprobs, ref_logprobs = logprobs.to(acc), ref_logprobs.to(acc)
    if kind.endswith("+"):
        value = kl_penalty(logprobs, ref_logprobs, kind[:-1], clamp=clamp)
        # verl writes r^2/2 - (r^2/2).detach() + value.detach(), which is NaN (inf - inf)
        # wherever r^2 overflows (|r| > 1.8e19 in float32) or r is infinite.
        return _StraightThrough.apply(value.detach(), logprobs - ref_logprobs)
    if kind in ("k1", "kl"):
        value = logprobs - ref_logprobs
    elif kind == "abs":
        value = (logprobs - ref_logprobs).abs()
    elif kind in ("k2", "mse"):
        value = 0.5 * (logprobs - ref_logprobs).square()
    elif kind in ("k3", "low_var_kl"):
        kl = torch.clamp(ref_logprobs - logprobs, min=-20, max=20)
        value = torch.exp(kl) - kl - 1
        clamp = 10.0 if clamp is None else clamp
    else:
        raise ValueError(f"kl_penalty: unknown kind {kind!r}")
    if clamp is not None:
        value = torch.clamp(value, min=-clamp, max=clamp)
    return value
