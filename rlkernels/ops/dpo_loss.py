"""rlkernels.dpo_loss: direct preference losses (DPO, IPO, hinge, robust DPO) on
per-sequence log-probs, fused with their gradient, on the op rlkernels::dpo_loss."""
from __future__ import annotations

import torch

from .. import _backend, _validate as V, reference
from ..reference.losses import PREFERENCE_KINDS
from .._dtypes import acc_dtype
from . import _double_backward

_OP = "rlkernels::dpo_loss"
_NAMES = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses from summed sequence log-probs `[B]` (see
    rlkernels.sequence_logprobs), as TRL's DPOTrainer defines them.  With
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)::

        sigmoid  -(1 - ls) logsigmoid(beta z) - ls logsigmoid(-beta z)          DPO (cDPO with ls)
        robust   (-(1 - ls) logsigmoid(beta z) + ls logsigmoid(-beta z)) / (1 - 2 ls)   robust DPO
        hinge    relu(1 - beta z)                                                SLiC
        ipo      (z - 1 / (2 beta))^2                                            IPO

    (ls = label_smoothing, the assumed probability that a preference label is flipped;
    sigmoid takes 0 <= ls <= 0.5, robust 0 <= ls < 0.5, hinge and ipo none).  Returns
    (losses, chosen_rewards, rejected_rewards), all `[B]` float32 (float64 for float64
    input); rewards are beta (policy - ref), without gradient.  Gradients flow to all
    four log-prob inputs (the reference ones are usually constants).  Take
    `losses.mean()` for the batch loss.  IPO's paper and TRL apply it to length-averaged
    log-probs: use sequence_logprobs(..., average=True) for those.
    """
    op = dpo_loss.__name__
    beta = V.number(op, "beta", beta, low=0.0, low_open=True, finite=True)
    V.choice(op, "kind", kind, PREFERENCE_KINDS)
    label_smoothing = V.number(op, "label_smoothing", label_smoothing, low=0.0,
                               high=0.5, high_open=kind == "robust")
    if kind in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"{op}: label_smoothing applies to kind 'sigmoid' and 'robust' only, got kind={kind!r}")
    tensors = dict(zip(_NAMES, (policy_chosen, policy_rejected, ref_chosen, ref_rejected)))
    V.float_tensor(op, "policy_chosen", policy_chosen, ndim=1)
    dtype = policy_chosen.dtype
    for name, value in tensors.items():
        V.float_tensor(op, name, value)
        V.same_shape(op, name, value, "policy_chosen", policy_chosen)
        dtype = torch.promote_types(dtype, value.dtype)
    device = V.same_device(op, **tensors)
    pc, pr, rc, rr = (t.to(dtype).contiguous() for t in tensors.values())
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.dpo_loss(pc, pr, rc, rr, beta=beta, kind=kind, label_smoothing=label_smoothing)
    fn = torch.ops.rlkernels.dpo_loss_triton if chosen == "triton" else torch.ops.rlkernels.dpo_loss
    losses, chosen_rewards, rejected_rewards, _ = fn(pc, pr, rc, rr, beta, kind, label_smoothing)
    return losses, chosen_rewards, rejected_rewards


def _fake(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind, label_smoothing):
    torch._check(policy_chosen.dim() == 1, lambda: "policy_chosen must be [B]")
    dtype = acc_dtype(policy_chosen.dtype)
    return tuple(policy_chosen.new_empty(policy_chosen.shape, dtype=dtype) for _ in range(4))


def _setup_context(ctx, inputs, output):
    losses, chosen_rewards, rejected_rewards, dlogits = output
    ctx.save_for_backward(dlogits, *inputs[:4])  # the inputs for first_order_only (references)
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, dlogits)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_losses, *unused):
    if grad_losses is None:
        return (None,) * 7
    dlogits, *inputs = ctx.saved_tensors
    g = grad_losses.to(dlogits.dtype) * dlogits  # d loss / d z; z = pc - pr - rc + rr
    signs = (1.0, -1.0, -1.0, 1.0)
    grads = [(g * s).to(dtype) for s, dtype in zip(signs, ctx.dtypes)]
    return (*_double_backward.first_order_only("dpo_loss", grads, inputs), None, None, None)


def register(op_name: str) -> None:
    torch.library.register_fake(op_name)(_fake)
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


register(_OP)
