"""rlkernels.masked_mean and rlkernels.masked_whiten: the masked reductions that
trainers aggregate losses and normalise advantages with."""
from __future__ import annotations

import math

import torch

from .. import _backend, _validate as V, reference
from .._dtypes import acc_dtype
from . import _registry

__all__ = ["masked_mean", "masked_whiten"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None, *,
                keepdim: bool = False, backend: str = "auto") -> torch.Tensor:
    """Mean of x over the entries where mask is 1, over all entries (dim=None) or
    along `dim`.  Masked entries are selected away (NaN there never enters); a
    slice with no valid entry has mean 0 and passes no gradient.  float32 result
    (float64 for float64); differentiable in x."""
    op = "masked_mean"
    V.float_tensor(op, "x", x)
    device = V.same_device(op, x=x, mask=mask)
    mask = V.binary_mask(op, "mask", mask, x.shape, device)
    keepdim = V.flag(op, "keepdim", keepdim)
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{op}: dim must be an int or None, got {type(dim).__name__}")
        if not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
            raise ValueError(f"{op}: dim {dim} is out of range for a {x.dim()}-D x")
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.masked_mean(x, mask, dim, keepdim)
    if dim is None or x.dim() == 0:
        rows_x = x.reshape(1, -1)
        rows_m = mask.reshape(1, -1) if mask is not None else None
        kept = [1] * x.dim()
        out_shape = kept if keepdim else []
    else:
        dim = dim % x.dim()
        if x.dim() == 2 and dim == 1:
            # Already the op's [R, C] rows (the usual call): no views to make or undo.
            out = _registry.kernel("masked_row_mean", chosen)(x.contiguous(), mask)
            return out.unsqueeze(1) if keepdim else out
        last = dim == x.dim() - 1  # no movedim views to make
        rows_x = x if last else x.movedim(dim, -1)
        kept = list(rows_x.shape[:-1])
        rows = math.prod(kept)  # explicit: -1 is ambiguous when the reduced dim is empty
        rows_x = rows_x.reshape(rows, x.shape[dim])
        if mask is not None:
            rows_m = (mask if last else mask.movedim(dim, -1)).reshape(rows, x.shape[dim])
        else:
            rows_m = None
        out_shape = list(x.shape)
        if keepdim:
            out_shape[dim] = 1
        else:
            out_shape.pop(dim)
    fn = _registry.kernel("masked_row_mean", chosen)
    rows_m = rows_m.contiguous() if rows_m is not None else None
    return fn(rows_x.contiguous(), rows_m).reshape(out_shape)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True,
                  eps: float = 1e-8, backend: str = "auto") -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased variance over the valid
    entries (TRL's and verl's masked_whiten); shift_mean=False adds the mean back.
    Masked entries come out as 0.  float32 (float64); no gradient (used on
    advantages, which are constants)."""
    op = "masked_whiten"
    V.float_tensor(op, "x", x)
    device = V.same_device(op, x=x, mask=mask)
    mask = V.binary_mask(op, "mask", mask, x.shape, device)
    eps = V.number(op, "eps", eps, low=0.0, finite=True)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"{op}: shift_mean must be a bool, got {type(shift_mean).__name__}")
    chosen = _backend.resolve(op, backend, device)
    with torch.no_grad():
        if chosen == "reference":
            return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
        return _registry.kernel("masked_whiten", chosen)(x.contiguous(), mask, shift_mean, eps)


def _row_mean_fake(x, mask):
    torch._check(x.dim() == 2, lambda: "x must be [R, C]")
    return x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype))


def _whiten_fake(x, mask, shift_mean, eps):
    return x.new_empty(x.shape, dtype=acc_dtype(x.dtype))


def _row_mean_setup(ctx, inputs, output):
    x, mask = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(mask)
    ctx.columns = x.shape[1]


# The Triton twin's autograd; the compiled op's is csrc/autograd/masked.cpp, the same formula in ATen.
def _row_mean_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    if mask is None:
        grad_x = (grad / max(ctx.columns, 1)).unsqueeze(1).expand(-1, ctx.columns)
    else:
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(grad.dtype)
        grad_x = torch.where(mask, grad.unsqueeze(1) / count, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad_x.to(ctx.x_dtype), None


_registry.register("masked_row_mean", fake=_row_mean_fake, backward=_row_mean_backward,
                   setup_context=_row_mean_setup)
_registry.register("masked_whiten", fake=_whiten_fake)
