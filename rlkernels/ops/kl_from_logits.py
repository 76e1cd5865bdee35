"""rlkernels.kl_from_logits: exact per-token KL(pi || pi_ref) over the whole
vocabulary, from both models' logits, in one fused pass (verl raises
NotImplementedError for this "full" KL)."""
from __future__ import annotations

import torch

from .. import reference
from .._dtypes import acc_dtype
from . import _double_backward, _logits as L, _registry

__all__ = ["kl_from_logits"]

_OP = "kl_from_logits"


def kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
                   mask: torch.Tensor | None = None, group=None, exact: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """KL(pi || pi_ref) = sum_j p_j (log p_j - log q_j) per token, with p = softmax(logits / T)
    and q = softmax(ref_logits / T).

    logits, ref_logits: `[..., V]` of one dtype (float32, bfloat16, float16; float64 on the
    reference), strided rows accepted.  mask: 0/1 of the leading shape; masked tokens get
    KL 0 and no gradient, and the kernels skip them.  Returns float32 of the leading shape.
    Gradients: dKL/dlogits_j = p_j (log p_j - log q_j - KL) / T and, when ref_logits
    requires grad, dKL/dref_logits_j = (q_j - p_j) / T, in the logits' dtype.
    group: a torch.distributed process group over which the vocabulary is sharded
    (tensor parallel): logits and ref_logits are this rank's contiguous shard, shards in
    rank order; every rank gets the full-vocabulary result (docs/distributed.md,
    rlkernels.distributed.vocab_parallel for the keywords that tune it); exact=True there
    gives the unsharded CPU op's bits (CPU, shards on chunk edges; ignored without group).
    """
    if group is not None:
        from ..distributed import vocab_parallel

        return vocab_parallel.kl_from_logits(logits, ref_logits, group=group, temperature=temperature, mask=mask,
                                             exact=exact, backend=backend)
    device, mask = L.logits_pair(_OP, logits, ref_logits, mask)
    temperature = L.temperature(_OP, temperature)
    chosen = L.choose_backend(_OP, backend, device, logits.dtype)
    if logits.shape[-1] == 0:
        # No vocabulary: KL is an empty sum, 0 on every backend (and differentiable, with empty gradients).
        return (logits.sum(-1) + ref_logits.sum(-1)).to(acc_dtype(logits.dtype))
    if chosen == "reference":
        return reference.kl_from_logits(logits, ref_logits, temperature=temperature, mask=mask)
    return _registry.kernel(_OP, chosen)(logits, ref_logits, mask, temperature)[0]


def _fake_forward(logits, ref_logits, mask, temperature):
    torch._check(ref_logits.shape == logits.shape, lambda: "ref_logits must have the shape of logits")
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=torch.float32), logits.new_empty((*lead, 5), dtype=torch.float32)


def _fake_backward(grad_kl, logits, ref_logits, mask, saved, temperature, logits_grad, ref_grad):
    return (logits.new_empty(logits.shape if logits_grad else (0,)),
            logits.new_empty(logits.shape if ref_grad else (0,)))


def _setup_context(ctx, inputs, output):
    logits, ref_logits, mask, temperature = inputs
    ctx.save_for_backward(logits, ref_logits, mask, output[1])
    ctx.temperature = temperature


@_double_backward.recorded(_OP)
def _recorded_backward(grad_kl, logits, ref_logits, mask, temperature, logits_grad, ref_grad):
    """The gradients recomputed through the reference, differentiably (None where not needed)."""
    def recompute(x, ref):
        return reference.kl_from_logits(x, ref, temperature=temperature, mask=mask)

    return _double_backward.through_reference(recompute, (logits, ref_logits), (logits_grad, ref_grad), (grad_kl,))


# The Triton twin's autograd; the compiled op's is csrc/autograd/kl_from_logits.cpp, the same steps.
def _backward(ctx, grad_kl, _grad_saved):
    logits, ref_logits, mask, saved = ctx.saved_tensors
    logits_grad, ref_grad = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if not (logits_grad or ref_grad):
        return None, None, None, None
    if _double_backward.recording():
        grad_logits, grad_ref = _recorded_backward(grad_kl, logits, ref_logits, mask, ctx.temperature, logits_grad,
                                                   ref_grad)
        return grad_logits, grad_ref, None, None
    if grad_kl is None:
        grad_kl = torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    backward = _registry.kernel("kl_from_logits_backward", ctx.backend)
    grad_logits, grad_ref = backward(grad_kl.to(torch.float32).contiguous(), logits, ref_logits, mask, saved,
                                     ctx.temperature, logits_grad, ref_grad)
    return (grad_logits if logits_grad else None), (grad_ref if ref_grad else None), None, None


_registry.register(_OP, fake=_fake_forward, backward=_backward, setup_context=_setup_context)
_registry.register("kl_from_logits_backward", fake=_fake_backward)


# kl_vocab_tile: KL's chunk rule in pieces (csrc/core/kl_from_logits.h), which
# rlkernels.distributed.vocab_parallel.kl_from_logits(exact=True) runs; no public function.
def _fake_kl_vocab_tile(logits, ref_logits, state, temperature, vocab_start, finish):
    return None  # updates `state` in place


_registry.register("kl_vocab_tile", fake=_fake_kl_vocab_tile)
