"""Validation, fake kernels and autograd shared by the token-level losses (ppo_loss,
grpo_loss, value_loss).  Their ops return (loss, stats, grad, row_scale): the
per-token gradient before aggregation and each row's share of the aggregation,
so backward is one broadcast multiply."""
from __future__ import annotations

import torch

from .. import _validate as V
from .._dtypes import acc_dtype
from .._library import _C
from ..reference._token_loss import AGG_MODES
from . import _double_backward, _registry


def optional_positive(op: str, name: str, value, *, finite: bool = True) -> float | None:
    return None if value is None else V.number(op, name, value, low=0.0, low_open=True, finite=finite)


def normalisers(op: str, agg: str, num_tokens, num_seqs, norm_length):
    V.choice(op, "agg", agg, AGG_MODES)
    return (optional_positive(op, "num_tokens", num_tokens), optional_positive(op, "num_seqs", num_seqs),
            optional_positive(op, "norm_length", norm_length))


def token_tensors(op: str, primary_name: str, primary, others: dict, mask, *, per_row: tuple[str, ...] = (),
                  required: tuple[str, ...] = ()):
    """Checks a [B, T] primary tensor, same-shape companions (None allowed unless named
    in `required`; names in `per_row` may also be [B] or [B, 1]) and the mask.  Returns
    the tensors promoted to one float dtype and contiguous, in the order given, then the
    bool mask and device."""
    V.float_tensor(op, primary_name, primary, ndim=2)
    shape, dtype, device = primary.shape, primary.dtype, primary.device
    # The usual call: companions of the primary's dtype, shape (or [B] where per row) and
    # device, a bool mask of the shape (or none), all contiguous.  They pass every check
    # below as they are.
    if (mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == shape
                         and mask.device == device and mask.is_contiguous())) and primary.is_contiguous():
        for name, value in others.items():
            if value is None:
                if name in required:
                    break
            elif not (isinstance(value, torch.Tensor) and value.dtype == dtype and value.device == device
                      and (value.shape == shape or (name in per_row and value.dim() == 1
                                                    and value.shape[0] == shape[0]))
                      and value.is_contiguous()):
                break
        else:
            return [primary, *others.values()], mask, device
    B = shape[0]
    # A companion of the primary's shape, dtype and device (the usual call) passes every
    # check below as it is; the others take them one by one, in the order that decides
    # which error a bad call gets.
    uniform = True
    for name, value in others.items():
        if value is None:
            if name in required:
                raise TypeError(f"{op}: {name} must be a torch.Tensor, got None")
            continue
        if isinstance(value, torch.Tensor) and value.dtype == primary.dtype and value.shape == shape \
                and value.device == device:
            continue
        uniform = False
        V.float_tensor(op, name, value)
        if name in per_row and value.shape in ((B,), (B, 1)):
            pass
        else:
            V.same_shape(op, name, value, primary_name, primary)
        if value.dtype != dtype:
            dtype = torch.promote_types(dtype, value.dtype)
    if not uniform:
        V.same_device(op, **{primary_name: primary}, **others, mask=mask)
    elif mask is not None:
        V.same_device(op, **{primary_name: primary}, mask=mask)
    mask = V.binary_mask(op, "mask", mask, shape, device)
    promoted = [V.as_dtype(primary, dtype)]
    for name, value in others.items():
        if value is not None:
            if name in per_row and value.dim() == 2 and value.shape[1] == 1 and shape[1] != 1:
                value = value.reshape(B)
            value = V.as_dtype(value, dtype)
        promoted.append(value)
    return promoted, mask, device


INF = float("inf")


def off_or(value: float | None) -> float:
    """An optional limit as an op coefficient: inf when off."""
    return INF if value is None else float(value)


def count_or(value: float | None) -> float:
    """An optional normaliser as an op coefficient: -1 means "count it"."""
    return -1.0 if value is None else float(value)


def unused_companion(op: str, name: str, value, primary_name: str, primary: torch.Tensor) -> None:
    """A tensor the call does not use (ref_logprobs with beta = 0) is still checked: a
    wrong one is a bug upstream that would surface once it is used."""
    if value is not None:
        V.float_tensor(op, name, value)
        if value.shape != primary.shape:
            raise ValueError(f"{op}: {name} must have the shape of {primary_name} {tuple(primary.shape)}, "
                             f"got {tuple(value.shape)}")


def need_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def stats_dict(names: tuple[str, ...], stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: 0-dim stat}.  Every backend's kernel keeps a NaN ratio in ratio_max itself
    (finalize_rows, csrc/core/token_loss.h).  Eager calls on plain tensors take the
    compiled helper (2 us); traced calls and tensor subclasses one unbind (3.5 us, where
    indexing costs ~1 us a stat)."""
    if type(stats) is torch.Tensor and not stats.requires_grad and not torch.compiler.is_compiling() \
            and _C is not None:
        return _C.stat_views(names, stats)
    return dict(zip(names, stats.unbind(0)))


def fake_outputs(primary: torch.Tensor, num_stats: int, need_grad: bool):
    torch._check(primary.dim() == 2, lambda: "the loss inputs must be [B, T]")
    dtype = acc_dtype(primary.dtype)
    B, T = primary.shape
    return (primary.new_empty((), dtype=dtype), primary.new_empty((num_stats,), dtype=dtype),
            primary.new_empty((B, T) if need_grad else (0,), dtype=dtype), primary.new_empty((B,), dtype=dtype))


def _scale_rows_fake(grad, row_scale, grad_loss, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    _, stats, grad, row_scale = output
    # the input only marks where a double backward must raise (a reference, no copy)
    ctx.save_for_backward(grad, row_scale, inputs[0])
    ctx.input_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(stats, grad, row_scale)
    # The other outputs get no gradient: do not materialise zeros of their size.
    ctx.set_materialize_grads(False)


def register(name: str, fake, num_inputs: int, public_name: str) -> None:
    """Fake kernel and backward of a token loss op: d loss / d input_0 = grad_loss *
    row_scale[b] * grad[b, t], computed by the scale_rows op (grad, row_scale, grad_loss,
    dtype) -> [B, T]: a kernel, whose small problems stay on one thread (a torch broadcast
    multiply would wake a thread pool)."""

    # The Triton twin's autograd; the compiled op's is csrc/autograd/token_loss.cpp, the same steps.
    def backward(ctx, grad_loss, *unused):
        grad, row_scale, primary = ctx.saved_tensors
        if grad_loss is None or grad.dim() != 2:  # no gradient needed
            return (None,) * num_inputs
        grad_input = _registry.kernel("scale_rows", ctx.backend)(grad, row_scale, grad_loss, ctx.input_dtype)
        return *_double_backward.first_order_only(public_name, (grad_input,), (primary,)), *((None,) * (num_inputs - 1))

    _registry.register(name, fake=fake, backward=backward, setup_context=_setup_context)


_registry.register("scale_rows", fake=_scale_rows_fake)
