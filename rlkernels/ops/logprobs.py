"""rlkernels.logprobs: per-token log-probs (and entropy) of labels under
softmax(logits / temperature), in one streaming pass over the vocabulary, with a
fused backward.  See docs/logprobs.md."""
from __future__ import annotations

import torch

from .. import reference
from . import _double_backward, _logits as L, _registry

__all__ = ["logprobs"]

_OP = "logprobs"


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
             entropy: bool = False, inplace_backward: bool = False, group=None, exact: bool = False,
             backend: str = "auto"):
    """log p(label) with p = softmax(logits / temperature), per token.

    logits: `[..., V]` float32, bfloat16 or float16 (float64 runs on the reference);
    rows may be strided (e.g. `logits[:, :-1]`), the last dim must be the vocabulary.
    labels: int64 or int32 of the leading shape, in [0, V) or equal to ignore_index.

    Returns float32 log-probs of the leading shape, 0 where labels == ignore_index;
    with entropy=True also the float32 entropy H = -sum_j p_j log p_j per token (0 on
    ignored tokens, which the kernels skip entirely).  Gradients flow to logits:
    ``dlogits = (dlogp * (onehot - p) - dH * p * (log p + H)) / temperature``, written
    in the logits' dtype; inplace_backward=True writes them into the logits buffer
    (which the backward then overwrites) instead of a fresh tensor.
    group: a torch.distributed process group over which the vocabulary is sharded
    (tensor parallel): logits is this rank's contiguous shard, shards in rank order, labels
    global ids; every rank gets the full-vocabulary result (docs/distributed.md,
    rlkernels.distributed.vocab_parallel for the keywords that tune it); exact=True there
    gives the unsharded CPU op's bits (CPU, shards on chunk edges; ignored without group).
    """
    if group is not None:
        if inplace_backward:
            raise ValueError(f"{_OP}: inplace_backward is not supported with group= (vocabulary-parallel)")
        from ..distributed import vocab_parallel

        return vocab_parallel.logprobs(logits, labels, group=group, temperature=temperature,
                                       ignore_index=ignore_index, entropy=entropy, exact=exact, backend=backend)
    L.logits_tensor(_OP, "logits", logits)
    ignore_index = L.index(_OP, "ignore_index", ignore_index)
    labels = L.labels_for(_OP, labels, logits, ignore_index, check_range=False)
    temperature = L.temperature(_OP, temperature)
    entropy, inplace_backward = bool(entropy), bool(inplace_backward)
    chosen = L.choose_backend(_OP, backend, logits.device, logits.dtype)
    if chosen != "cpu":
        # The CPU op checks the label range in one pass of its own (csrc/cpu/logprobs.cpp);
        # the other backends do not.
        L.label_range(_OP, labels, logits.shape[-1], ignore_index)
    if chosen == "reference":
        return reference.logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                  entropy=entropy)
    op = _registry.kernel(_OP, chosen)
    try:
        values, entropies, _ = op(logits, labels, temperature, ignore_index, entropy, inplace_backward)
    except RuntimeError:
        if chosen == "cpu":  # the CPU op's label check: raise the public ValueError instead
            L.label_range(_OP, labels, logits.shape[-1], ignore_index)
        raise
    return (values, entropies) if entropy else values


# ---- fake kernels and autograd (the compiled op and its Triton twin share them) ---------------

def _fake_forward(logits, labels, temperature, ignore_index, with_entropy, inplace_backward):
    torch._check(logits.dim() >= 1, lambda: "logits must have a vocabulary dimension")
    torch._check(labels.shape == logits.shape[:-1], lambda: "labels must have the leading shape of logits")
    lead = logits.shape[:-1]
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty(lead, **f32), logits.new_empty(lead if with_entropy else (0,), **f32),
            logits.new_empty((*lead, 2), **f32))


def _fake_backward(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                   vocab_start=0):
    return logits.new_empty(logits.shape)


def _fake_backward_inplace(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                           vocab_start=0):
    return None


def _fake_vocab_tile(logits, labels, state, temperature, ignore_index, vocab_start, with_entropy, finish):
    return None  # updates `state` in place


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, _with_entropy, inplace_backward = inputs
    _, entropies, saved = output
    ctx.save_for_backward(logits, labels, saved, entropies)
    ctx.temperature, ctx.ignore_index, ctx.inplace_backward = temperature, ignore_index, inplace_backward


def no_room_in_place(t: torch.Tensor) -> bool:
    """True where `t`'s buffer cannot hold the gradient, so the in-place backward falls
    back to a fresh gradient: elements that may share memory (expanded, stride 0) cannot
    each hold their own, and a negated or conjugate view's bytes are not its values."""
    if torch.compiler.is_compiling():
        return False
    if t.is_neg() or t.is_conj():
        return True
    return torch._debug_has_internal_overlap(t) != 0  # 0: no overlap, 1: overlap, 2: too hard to tell


def _row_grad(grad: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    return grad.to(torch.float32).contiguous()


@_double_backward.recorded(_OP)
def _recorded_backward(grad_logprobs, grad_entropy, logits, labels, temperature, ignore_index, with_entropy):
    """The gradient to logits recomputed through the reference, differentiably."""
    def recompute(x):
        return reference.logprobs(x, labels, temperature=temperature, ignore_index=ignore_index, entropy=with_entropy)

    return _double_backward.through_reference(recompute, (logits,), (True,), (grad_logprobs, grad_entropy))


# The Triton twin's autograd; the compiled op's is csrc/autograd/logprobs.cpp, the same steps.
def _backward(ctx, grad_logprobs, grad_entropy, _grad_saved):
    logits, labels, saved, entropies = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    if _double_backward.recording():
        with_entropy = entropies.shape == labels.shape
        (grad,) = _recorded_backward(grad_logprobs, grad_entropy if with_entropy else None, logits, labels,
                                     ctx.temperature, ctx.ignore_index, with_entropy)
        return grad, None, None, None, None, None
    grad_logprobs = _row_grad(grad_logprobs, labels)
    with_entropy = entropies.shape == labels.shape and grad_entropy is not None
    grad_entropy = _row_grad(grad_entropy, labels) if with_entropy else None
    args = (grad_logprobs, grad_entropy, logits, labels, saved, entropies, ctx.temperature, ctx.ignore_index)
    if ctx.inplace_backward and not no_room_in_place(logits):
        _registry.kernel("logprobs_backward_inplace", ctx.backend)(*args)
        # The logits now hold the gradient: bump their version so that autograd raises
        # where anything (another op's backward, a second backward through this one)
        # still needs the old values, rather than reading the gradient as logits.
        if not torch.compiler.is_compiling():
            torch.autograd.graph.increment_version(logits)
        grad = logits.detach()
    else:
        grad = _registry.kernel("logprobs_backward", ctx.backend)(*args)
    return grad, None, None, None, None, None


_registry.register(_OP, fake=_fake_forward, backward=_backward, setup_context=_setup_context)
_registry.register("logprobs_backward", fake=_fake_backward)
_registry.register("logprobs_backward_inplace", fake=_fake_backward_inplace)
_registry.register("logprobs_vocab_tile", fake=_fake_vocab_tile)
