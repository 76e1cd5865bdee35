"""rlkernels.kl_penalty: per-token KL penalty estimators between the policy's and
the reference model's log-probs, with gradients (verl's kl_penalty kinds)."""
from __future__ import annotations

import math

import torch

from .. import _backend, _validate as V, reference
from .._dtypes import acc_dtype
from . import _double_backward, _registry

__all__ = ["kl_penalty"]

_OP = "kl_penalty"
KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs", "k1+", "k3+")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1", *,
               clamp: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Per-token KL penalty from log-probs of the sampled tokens, r = logprobs - ref_logprobs:

    - ``k1`` / ``kl``: r
    - ``k2`` / ``mse``: r^2 / 2
    - ``k3`` / ``low_var_kl``: e^{c} - c - 1 with c = clamp(-r, -20, 20), value clamped to +-10 (verl's
      low_var_kl: Schulman's (rho - 1) - log rho with rho = p_ref / p = e^{-r})
    - ``abs``: |r|
    - ``k1+``, ``k3+``: the value of k1 / k3 with the gradient of k2 (straight-through)

    clamp: the value is clamped to [-clamp, clamp], with zero gradient outside (not for
    the straight-through kinds, whose gradient stays k2's); None means the kind's default
    (10 for k3, none otherwise), ``float('inf')`` no clamp.  Inputs of one shape; float32
    result (float64 for float64 input).  Gradients flow to both inputs.  Formulas in
    docs/logprobs.md.
    """
    V.float_tensor(_OP, "logprobs", logprobs)
    V.float_tensor(_OP, "ref_logprobs", ref_logprobs)
    V.same_shape(_OP, "ref_logprobs", ref_logprobs, "logprobs", logprobs)
    device = V.same_device(_OP, logprobs=logprobs, ref_logprobs=ref_logprobs)
    kind = V.choice(_OP, "kind", kind, KINDS)
    if clamp is not None:
        clamp = V.number(_OP, "clamp", clamp, low=0.0, low_open=True)
    if logprobs.dtype != ref_logprobs.dtype:
        common = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
        logprobs, ref_logprobs = logprobs.to(common), ref_logprobs.to(common)
    chosen = _backend.resolve(_OP, backend, device)
    if chosen == "reference":
        return reference.kl_penalty(logprobs, ref_logprobs, kind, clamp=clamp)
    if clamp is None:
        clamp = 10.0 if kind in ("k3", "low_var_kl", "k3+") else math.inf
    return _registry.kernel(_OP, chosen)(logprobs, ref_logprobs, kind, clamp)[0]


def _fake(logprobs, ref_logprobs, kind, clamp):
    torch._check(ref_logprobs.shape == logprobs.shape, lambda: "ref_logprobs must have the shape of logprobs")
    dtype = acc_dtype(logprobs.dtype)
    return logprobs.new_empty(logprobs.shape, dtype=dtype), logprobs.new_empty(logprobs.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, kind, clamp = inputs
    # The inputs are kept for a double backward only (references, no copies).
    ctx.save_for_backward(output[1], logprobs, ref_logprobs)
    ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
    ctx.kind, ctx.clamp = kind, clamp


@_double_backward.recorded(_OP)
def _recorded_backward(grad_value, logprobs, ref_logprobs, kind, clamp, logprobs_grad, ref_grad):
    """The gradients through the reference: the saved slope is a constant to autograd, the
    reference's graph carries the curvature."""
    return _double_backward.through_reference(lambda lp, ref: reference.kl_penalty(lp, ref, kind, clamp=clamp),
                                              (logprobs, ref_logprobs), (logprobs_grad, ref_grad), (grad_value,))


# The Triton twin's autograd; the compiled op's is csrc/autograd/kl_penalty.cpp, the same steps.
def _backward(ctx, grad_value, _grad_slope):
    slope, logprobs, ref_logprobs = ctx.saved_tensors
    if _double_backward.recording():
        grads = _recorded_backward(grad_value, logprobs, ref_logprobs, ctx.kind, ctx.clamp, *ctx.needs_input_grad[:2])
        return grads[0], grads[1], None, None
    grad = grad_value * slope if grad_value is not None else torch.zeros_like(slope)
    grad_logprobs = grad.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_ref = (-grad).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return grad_logprobs, grad_ref, None, None


_registry.register(_OP, fake=_fake, backward=_backward, setup_context=_setup_context)
