"""rlkernels.dpo_loss and rlkernels.sequence_logprobs: direct preference losses (DPO,
IPO, hinge, robust DPO) on per-sequence log-probs, fused with their gradient, and the
masked per-sequence sums (or means) of token log-probs they take as inputs;
rlkernels.dpo_sequence_loss, the two in one op from token log-probs."""
from __future__ import annotations

import torch

from .. import _backend, _validate as V, reference
from ..reference.preference import PREFERENCE_KINDS
from .._dtypes import acc_dtype
from . import _double_backward, _packed, _registry

__all__ = ["dpo_loss", "dpo_sequence_loss", "sequence_logprobs"]

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
    beta, label_smoothing = _pair_options(op, beta, kind, label_smoothing)
    tensors = dict(zip(_NAMES, (policy_chosen, policy_rejected, ref_chosen, ref_rejected)))
    V.float_tensor(op, "policy_chosen", policy_chosen, ndim=1)
    dtype = policy_chosen.dtype
    for name, value in tensors.items():
        V.float_tensor(op, name, value)
        V.same_shape(op, name, value, "policy_chosen", policy_chosen)
        if value.dtype != dtype:
            dtype = torch.promote_types(dtype, value.dtype)
    device = V.same_device(op, **tensors)
    pc, pr, rc, rr = (V.as_dtype(t, dtype) for t in tensors.values())
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.dpo_loss(pc, pr, rc, rr, beta=beta, kind=kind, label_smoothing=label_smoothing)
    fn = _registry.kernel("dpo_loss", chosen)
    losses, chosen_rewards, rejected_rewards, _ = fn(pc, pr, rc, rr, beta, kind, label_smoothing)
    return losses, chosen_rewards, rejected_rewards


def _pair_options(op: str, beta, kind, label_smoothing) -> tuple[float, float]:
    """The checked beta and label_smoothing of a preference loss of `kind`."""
    beta = V.number(op, "beta", beta, low=0.0, low_open=True, finite=True)
    V.choice(op, "kind", kind, PREFERENCE_KINDS)
    label_smoothing = V.number(op, "label_smoothing", label_smoothing, low=0.0,
                               high=0.5, high_open=kind == "robust")
    if kind in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"{op}: label_smoothing applies to kind 'sigmoid' and 'robust' only, got kind={kind!r}")
    return beta, label_smoothing


def _dpo_fake(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind, label_smoothing):
    torch._check(policy_chosen.dim() == 1, lambda: "policy_chosen must be [B]")
    dtype = acc_dtype(policy_chosen.dtype)
    return tuple(policy_chosen.new_empty(policy_chosen.shape, dtype=dtype) for _ in range(4))


def _dpo_setup_context(ctx, inputs, output):
    losses, chosen_rewards, rejected_rewards, dlogits = output
    ctx.save_for_backward(dlogits, *inputs[:4])  # the inputs for first_order_only (references)
    ctx.dtypes = tuple(t.dtype for t in inputs[:4])
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, dlogits)
    ctx.set_materialize_grads(False)


# The Triton twin's autograd; the compiled op's is csrc/autograd/preference.cpp, the same steps.
def _dpo_backward(ctx, grad_losses, *unused):
    if grad_losses is None:
        return (None,) * 7
    dlogits, *inputs = ctx.saved_tensors
    g = grad_losses.to(dlogits.dtype) * dlogits  # d loss / d z; z = pc - pr - rc + rr
    signs = (1.0, -1.0, -1.0, 1.0)
    grads = [(g * s).to(dtype) for s, dtype in zip(signs, ctx.dtypes)]
    return (*_double_backward.first_order_only("dpo_loss", grads, inputs), None, None, None)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor | None = None, *, average: bool = False,
                      labels: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                      cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      max_seqlen: int | None = None, backend: str = "auto") -> torch.Tensor:
    """sum_t mask[b, t] * token_logprobs[b, t] for each row of `[B, T]` (the log-prob of
    the whole completion), or with average=True the mean over the row's valid tokens
    (0 for a row without any).  Masked slots are selected away: NaN or -inf there
    never reaches the result.  Returns `[B]` float32 (float64 for float64 input), with
    gradient w.r.t. token_logprobs.

    With `labels` `[B, T]`, the first argument is logits `[B, T, V]`: the token
    log-probs come from the fused `rlkernels.logprobs` kernel (at `temperature`), and
    tokens whose label is `ignore_index` count as masked; the gradient flows to the
    logits.

    Packed: token_logprobs `[total]` / `[1, total]` (logits `[total, V]` / `[1, total, V]`
    with labels of the token layout) and `cu_seqlens` or `position_ids` give one value
    per sequence, `[S]`."""
    op = sequence_logprobs.__name__
    packed = cu_seqlens is not None or position_ids is not None
    if packed and labels is not None and isinstance(token_logprobs, torch.Tensor) and token_logprobs.dim() == 2:
        # [total, V] logits: the token log-probs come from the [1, total, V] view, a layout
        # the packed path takes as it is.
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"{op}: labels must be [total] for [total, V] logits")
        def as_row(t):
            return t.reshape(1, -1) if isinstance(t, torch.Tensor) else t

        return sequence_logprobs(token_logprobs.unsqueeze(0), as_row(mask), average=average,
                                 labels=labels.unsqueeze(0), temperature=temperature, ignore_index=ignore_index,
                                 cu_seqlens=cu_seqlens, position_ids=as_row(position_ids), max_seqlen=max_seqlen,
                                 backend=backend)
    if labels is not None:
        V.float_tensor(op, "logits", token_logprobs, ndim=3)
        V.tensor(op, "labels", labels, dtypes=V.INDEX_DTYPES, ndim=2)
        if labels.shape != token_logprobs.shape[:2]:
            raise ValueError(f"{op}: labels must have shape {tuple(token_logprobs.shape[:2])}, "
                             f"got {tuple(labels.shape)}")
        from .logprobs import logprobs as _token_logprobs

        per_token = _token_logprobs(token_logprobs, labels, temperature=temperature, ignore_index=ignore_index,
                                    backend=backend)
        labelled = labels != ignore_index
        if mask is not None:
            mask = V.binary_mask(op, "mask", mask, labels.shape, labels.device) & labelled
        else:
            mask = labelled
        return sequence_logprobs(per_token, mask, average=average, cu_seqlens=cu_seqlens, position_ids=position_ids,
                                 max_seqlen=max_seqlen, backend=backend)
    if packed:
        pk = _packed.packing(op, "token_logprobs", token_logprobs, cu_seqlens, position_ids, max_seqlen)
        return sequence_logprobs(pk.pad(op, "token_logprobs", token_logprobs), pk.mask(op, mask), average=average,
                                 backend=backend)
    token_logprobs, mask, device = _token_rows(op, average, mask, token_logprobs=token_logprobs)
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.sequence_logprobs(token_logprobs, mask, average=average)
    return _registry.kernel("sequence_logprobs", chosen)(token_logprobs, mask, average)[0]


def _token_rows(op: str, average, mask, **tensors: torch.Tensor):
    """The checks of sequence_logprobs' [B, T] token log-probs (one or more tensors of
    one shape, named by keyword), its `average` and its 0/1 mask: returns the tensors
    contiguous (the first's dtype for the rest: one dtype for the kernels; the autograd
    of a cast carries gradients back), the mask as bool or None, and the device."""
    (first_name, first), *rest = tensors.items()
    V.float_tensor(op, first_name, first, ndim=2)
    dtype = first.dtype
    for name, value in rest:
        V.float_tensor(op, name, value)
        V.same_shape(op, name, value, first_name, first)
        dtype = torch.promote_types(dtype, value.dtype)
    if not isinstance(average, bool):
        raise TypeError(f"{op}: average must be a bool, got {type(average).__name__}")
    device = V.same_device(op, **tensors, mask=mask)
    mask = V.binary_mask(op, "mask", mask, first.shape, device)
    return (*(V.as_dtype(t, dtype) for t in tensors.values()), mask, device)


def dpo_sequence_loss(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None,
                      *, beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
                      average: bool = False, backend: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole DPO step from token log-probs in one fused op: the masked per-sequence
    sums (or means with average=True) of the policy's and the reference's `[2B, T]`
    token log-probs, rows 0..B-1 the chosen completions and B..2B-1 the rejected ones
    (TRL's concatenated layout; one `mask` for both), and the pair losses of
    rlkernels.dpo_loss (`beta`, `kind`, `label_smoothing` as there).  Equal to::

        seq, ref = sequence_logprobs(policy_logprobs, mask), sequence_logprobs(ref_logprobs, mask)
        dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], ...)

    in two op calls instead of four: the forward reads each token tensor once, the
    backward writes each gradient once.
    Returns (losses, chosen_rewards, rejected_rewards), `[B]` float32 (float64 for
    float64 input); gradients flow to policy_logprobs (and to ref_logprobs if it
    requires grad), in their dtypes.  Take `losses.mean()` for the batch loss."""
    op = dpo_sequence_loss.__name__
    beta, label_smoothing = _pair_options(op, beta, kind, label_smoothing)
    policy_logprobs, ref_logprobs, mask, device = _token_rows(
        op, average, mask, policy_logprobs=policy_logprobs, ref_logprobs=ref_logprobs)
    if policy_logprobs.shape[0] % 2:
        raise ValueError(f"{op}: policy_logprobs must have an even number of rows (chosen rows, then as many "
                         f"rejected rows), got {policy_logprobs.shape[0]}")
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.dpo_sequence_loss(policy_logprobs, ref_logprobs, mask, beta=beta, kind=kind,
                                           label_smoothing=label_smoothing, average=average)
    fn = _registry.kernel("dpo_sequence_loss", chosen)
    losses, chosen_rewards, rejected_rewards, _ = fn(policy_logprobs, ref_logprobs, mask, beta, kind,
                                                     label_smoothing, average)
    return losses, chosen_rewards, rejected_rewards


def _dpo_sequence_fake(policy_logprobs, ref_logprobs, mask, beta, kind, label_smoothing, average):
    torch._check(policy_logprobs.dim() == 2, lambda: "policy_logprobs must be [2B, T]")
    torch._check(policy_logprobs.shape[0] % 2 == 0, lambda: "policy_logprobs must have an even number of rows")
    rows = policy_logprobs.shape[0]
    dtype = acc_dtype(policy_logprobs.dtype)
    pairs = tuple(policy_logprobs.new_empty((rows // 2,), dtype=dtype) for _ in range(3))
    return (*pairs, policy_logprobs.new_empty((rows,), dtype=dtype))


def _dpo_sequence_backward_fake(grad_losses, mask, coef, scale, T, dtype):
    return grad_losses.new_empty((coef.shape[0], T), dtype=dtype)


def _dpo_sequence_setup_context(ctx, inputs, output):
    policy_logprobs, ref_logprobs, mask = inputs[:3]
    coef = output[3]
    ctx.save_for_backward(coef, mask, policy_logprobs, ref_logprobs)  # the inputs for first_order_only
    ctx.T = policy_logprobs.shape[1]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


# The Triton twin's autograd; the compiled op's is csrc/autograd/preference.cpp, the same steps.
def _dpo_sequence_backward(ctx, grad_losses, *unused):
    if grad_losses is None:
        return (None,) * 7
    coef, mask, *inputs = ctx.saved_tensors
    backward = _registry.kernel("dpo_sequence_loss_backward", ctx.backend)
    grad_losses = grad_losses.to(coef.dtype)
    grads = [backward(grad_losses, mask, coef, scale, ctx.T, t.dtype) if need else None
             for scale, t, need in zip((1.0, -1.0), inputs, ctx.needs_input_grad[:2])]
    return (*_double_backward.first_order_only("dpo_sequence_loss", grads, inputs), None, None, None, None, None)


def _sequence_fake(token_logprobs, mask, average):
    torch._check(token_logprobs.dim() == 2, lambda: "token_logprobs must be [B, T]")
    B = token_logprobs.shape[0]
    dtype = acc_dtype(token_logprobs.dtype)
    return token_logprobs.new_empty((B,), dtype=dtype), token_logprobs.new_empty((B,), dtype=dtype)


def _sequence_backward_fake(grad, mask, num_tokens, average, T, dtype):
    return grad.new_empty((grad.shape[0], T), dtype=dtype)


def _sequence_setup_context(ctx, inputs, output):
    token_logprobs, mask, average = inputs
    _, counts = output
    ctx.save_for_backward(mask, counts)
    ctx.average = average
    ctx.T, ctx.dtype = token_logprobs.shape[1], token_logprobs.dtype
    ctx.mark_non_differentiable(counts)
    ctx.set_materialize_grads(False)


@_double_backward.recorded("sequence_logprobs")
def _recorded_sequence_backward(grad_out, mask, counts, average, T):
    """The gradient (in the counts' dtype) in torch ops: linear in grad_out, it stays
    differentiable."""
    grad_out = grad_out.to(counts.dtype)
    share = (torch.ones((counts.shape[0], T), dtype=counts.dtype, device=counts.device)
             if mask is None else mask.to(counts.dtype))
    if average:
        share = share / counts.clamp(min=1).unsqueeze(1)
    return (grad_out.unsqueeze(1) * share,)


# The Triton twin's autograd; the compiled op's is csrc/autograd/preference.cpp, the same steps.
def _sequence_backward(ctx, grad_out, unused):
    if grad_out is None:
        return None, None, None
    mask, counts = ctx.saved_tensors
    if _double_backward.recording():
        (grad,) = _recorded_sequence_backward(grad_out, mask, counts, ctx.average, ctx.T)
        return grad.to(ctx.dtype), None, None
    backward = _registry.kernel("sequence_logprobs_backward", ctx.backend)
    grad = backward(grad_out.to(counts.dtype).contiguous(), mask, counts, ctx.average, ctx.T, ctx.dtype)
    return grad, None, None


_registry.register("dpo_loss", fake=_dpo_fake, backward=_dpo_backward, setup_context=_dpo_setup_context)
_registry.register("sequence_logprobs", fake=_sequence_fake, backward=_sequence_backward,
                   setup_context=_sequence_setup_context)
_registry.register("sequence_logprobs_backward", fake=_sequence_backward_fake)
_registry.register("dpo_sequence_loss", fake=_dpo_sequence_fake, backward=_dpo_sequence_backward,
                   setup_context=_dpo_sequence_setup_context)
_registry.register("dpo_sequence_loss_backward", fake=_dpo_sequence_backward_fake)
