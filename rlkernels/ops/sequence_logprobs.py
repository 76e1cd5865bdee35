"""rlkernels.sequence_logprobs: masked per-sequence sums (or means) of token
log-probs, the inputs of the preference losses, on rlkernels::sequence_logprobs."""
from __future__ import annotations

import torch

from .. import _backend, _validate as V, reference
from .._dtypes import acc_dtype
from . import _double_backward

_OP = "rlkernels::sequence_logprobs"


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor | None = None, *, average: bool = False,
                      labels: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                      backend: str = "auto") -> torch.Tensor:
    """sum_t mask[b, t] * token_logprobs[b, t] for each row of `[B, T]` (the log-prob of
    the whole completion), or with average=True the mean over the row's valid tokens
    (0 for a row without any).  Masked slots are selected away: NaN or -inf there
    never reaches the result.  Returns `[B]` float32 (float64 for float64 input), with
    gradient w.r.t. token_logprobs.

    With `labels` `[B, T]`, the first argument is logits `[B, T, V]`: the token
    log-probs come from the fused `rlkernels.logprobs` kernel (at `temperature`), and
    tokens whose label is `ignore_index` count as masked; the gradient flows to the
    logits."""
    op = sequence_logprobs.__name__
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
        return sequence_logprobs(per_token, mask, average=average, backend=backend)
    V.float_tensor(op, "token_logprobs", token_logprobs, ndim=2)
    if not isinstance(average, bool):
        raise TypeError(f"{op}: average must be a bool, got {type(average).__name__}")
    device = V.same_device(op, token_logprobs=token_logprobs, mask=mask)
    mask = V.binary_mask(op, "mask", mask, token_logprobs.shape, device)
    token_logprobs = token_logprobs.contiguous()
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.sequence_logprobs(token_logprobs, mask, average=average)
    fn = torch.ops.rlkernels.sequence_logprobs_triton if chosen == "triton" else torch.ops.rlkernels.sequence_logprobs
    return fn(token_logprobs, mask, average)[0]


def _fake(token_logprobs, mask, average):
    torch._check(token_logprobs.dim() == 2, lambda: "token_logprobs must be [B, T]")
    B = token_logprobs.shape[0]
    dtype = acc_dtype(token_logprobs.dtype)
    return token_logprobs.new_empty((B,), dtype=dtype), token_logprobs.new_empty((B,), dtype=dtype)


@torch.library.register_fake("rlkernels::sequence_logprobs_backward")
def _backward_fake(grad, mask, num_tokens, average, T, dtype):
    return grad.new_empty((grad.shape[0], T), dtype=dtype)


def _setup_context(ctx, inputs, output):
    token_logprobs, mask, average = inputs
    _, counts = output
    ctx.save_for_backward(mask, counts)
    ctx.average = average
    ctx.T, ctx.dtype = token_logprobs.shape[1], token_logprobs.dtype
    ctx.mark_non_differentiable(counts)
    ctx.set_materialize_grads(False)


def register(op_name: str, backward_op) -> None:
    """Fake kernel and autograd of a sequence_logprobs op whose backward is `backward_op`
    (grad, mask, num_tokens, average, T, dtype) -> [B, T]."""

    def backward(ctx, grad_out, unused):
        if grad_out is None:
            return None, None, None
        mask, counts = ctx.saved_tensors
        if _double_backward.recording():
            # The gradient is linear in grad_out: written in torch ops it stays differentiable.
            grad_out = grad_out.to(counts.dtype)
            share = (torch.ones((counts.shape[0], ctx.T), dtype=counts.dtype, device=counts.device)
                     if mask is None else mask.to(counts.dtype))
            if ctx.average:
                share = share / counts.clamp(min=1).unsqueeze(1)
            return (grad_out.unsqueeze(1) * share).to(ctx.dtype), None, None
        grad = backward_op(grad_out.to(counts.dtype).contiguous(), mask, counts, ctx.average, ctx.T, ctx.dtype)
        return grad, None, None

    torch.library.register_fake(op_name)(_fake)
    torch.library.register_autograd(op_name, backward, setup_context=_setup_context)


register(_OP, torch.ops.rlkernels.sequence_logprobs_backward)
