"""Double backward (a gradient of a gradient: ``create_graph=True``, then a second
``grad``) for the ops whose backward is a kernel.  A kernel backward is opaque to
autograd, so without care the second derivative would come out as zeros with no
error.  Autograd runs a backward under grad mode exactly when that backward is itself
being recorded (``create_graph=True``, or a torch.func transform), so each backward
checks ``torch.is_grad_enabled()`` and then either

- recomputes its gradient through the op's pure-PyTorch reference, differentiably
  (`through_reference`: the KL and log-prob ops, whose Hessian-vector products TRPO
  and natural-gradient methods need), or
- returns its gradient wrapped so that differentiating it raises a RuntimeError that
  names the op (`first_order_only`: the fused losses, whose kernels keep no inputs to
  recompute from).

Plain first-order backward (grad mode off) takes neither path and costs nothing.

The compiled ops' C++ autograd (csrc/autograd/) reaches these same paths through
`from_cpp`, so each double backward is written once, here and in the ops' modules
(`recorded(name)` registers one)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# name -> the recorded backward that csrc/autograd/<family>.cpp calls through from_cpp.
_RECORDED: dict[str, Callable] = {}


def recorded(name: str):
    """Decorator: `fn` is the recorded (double-differentiable) backward of the op `name`,
    for the Python autograd of its Triton twin and, through from_cpp, its C++ autograd."""

    def register(fn: Callable) -> Callable:
        assert name not in _RECORDED, name
        _RECORDED[name] = fn
        return fn

    return register


def from_cpp(name: str, *args) -> tuple:
    """Called by the C++ autograd inside a recorded backward only (rlk::autograd::
    python_backward): the op's recorded backward, or first_order_only, as a tuple."""
    result = first_order_only(*args) if name == "first_order_only" else _RECORDED[name](*args)
    return tuple(result)


def recording() -> bool:
    """True inside a backward whose own graph is being recorded (create_graph=True)."""
    return torch.is_grad_enabled()


def through_reference(reference: Callable[..., Sequence[torch.Tensor] | torch.Tensor],
                      inputs: Sequence[torch.Tensor], needs_grad: Sequence[bool],
                      grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The vector-Jacobian product of `reference(*inputs)` with `grad_outputs`, as a
    differentiable function of the inputs and of `grad_outputs`; None for the inputs
    whose `needs_grad` is False.  `inputs` are the op's saved inputs, still attached to
    the graph that produced them, so the result's own gradient is the true second
    derivative."""
    wanted = [i for i, need in enumerate(needs_grad) if need]
    result: list[torch.Tensor | None] = [None] * len(inputs)
    if not wanted:
        return result
    with torch.enable_grad():
        outputs = reference(*inputs)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
             if grad is not None and out.requires_grad]
    if not pairs:
        for i in wanted:
            result[i] = torch.zeros_like(inputs[i])
        return result
    grads = torch.autograd.grad([out for out, _ in pairs], [inputs[i] for i in wanted],
                                [grad.to(out.dtype) for out, grad in pairs], create_graph=True,
                                allow_unused=True)
    for i, grad in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return result


def first_order_only(op: str, grads: Sequence[torch.Tensor | None],
                     inputs: Sequence[torch.Tensor | None]) -> tuple:
    """`grads` unchanged outside a recorded backward; inside one, the same values behind a
    node whose backward raises, so a second derivative is an error, never silent zeros.
    `inputs` are the op's saved differentiable inputs: the node hangs on their graph, so
    that autograd.grad(..., inputs) cannot prune it away (and answer None instead)."""
    if not recording():
        return tuple(grads)
    tensors = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not tensors:
        return tuple(grads)
    anchors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    message = (f"rlkernels.{op}: the compiled and Triton kernels compute first derivatives only; "
               "differentiating this gradient (create_graph=True, then another grad) is not supported there. "
               "Use backend='reference' for second derivatives.")
    delayed = torch._C._functions.DelayedError(message, len(tensors) + len(anchors))
    wrapped = delayed(*[grads[i].detach().requires_grad_() for i in tensors], *anchors)
    if isinstance(wrapped, torch.Tensor):
        wrapped = (wrapped,)
    out = list(grads)
    for i, g in zip(tensors, wrapped):
        out[i] = g
    return tuple(out)
