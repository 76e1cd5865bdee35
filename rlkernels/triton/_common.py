"""Helpers shared by the Triton kernels' host code."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype
from .._library import triton_interpreting

# Read by jitted code, so a tl.constexpr (see logprobs.py): whether the kernels run in
# the interpreter, whose conversions differ from a GPU's.  Fixed at import, as Triton
# itself decides interpreter or compiler when a kernel is decorated.
INTERPRETING = tl.constexpr(triton_interpreting())


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """x converted to `dtype`, rounding to nearest even as a GPU does.  The interpreter's
    float32 -> bfloat16 cast truncates, so there the rounding is done by hand; its integer
    add would carry a NaN's payload into the sign and exponent (0x7FFFFFFF -> -0.0), so
    NaN keeps its own bits.  Compiled, this is the plain cvt.rn conversion."""
    if INTERPRETING:
        if dtype == tl.bfloat16:
            x = x.to(tl.float32)
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
    return x.to(dtype)


def acc_types(dtype: torch.dtype):
    """(torch dtype, triton dtype) of the accumulation for inputs of `dtype`."""
    acc = acc_dtype(dtype)
    return acc, (tl.float64 if acc == torch.float64 else tl.float32)


def coef_tensor(device, dtype, *values) -> torch.Tensor:
    # Scalars travel in a tensor of the accumulation dtype: Triton would round a
    # float argument to float32, which a float64 computation must not see.  On a GPU
    # each value is written by a fill kernel that carries it as an argument: building
    # the tensor on the host and copying it over would wait for the copy (a sync, which
    # torch.cuda.set_sync_debug_mode flags) and cannot be captured in a CUDA graph.
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, value in enumerate(values):
        out[i].fill_(value)
    return out


def bool_arg(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A bool tensor as the kernel reads it (uint8, same storage); an absent one as
    `placeholder`, a pointer the kernel never dereferences."""
    return placeholder if t is None else t.view(torch.uint8)


def on_inputs_device(fn):
    """Runs a Triton op's host code with its inputs' GPU as the current device.

    Triton launches on the current device and its current stream; a tensor on cuda:1
    while cuda:0 is current would be read by a kernel on the wrong GPU.  The CUDA
    kernels take a device guard for the same reason."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = _first_device(args, kwargs)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run


def _first_device(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device
    return None
