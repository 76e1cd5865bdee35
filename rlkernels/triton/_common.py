"""Helpers shared by the Triton kernels' host code."""
from __future__ import annotations

import torch
import triton.language as tl

from .._dtypes import acc_dtype


def acc_types(dtype: torch.dtype):
    """(torch dtype, triton dtype) of the accumulation for inputs of `dtype`."""
    acc = acc_dtype(dtype)
    return acc, (tl.float64 if acc == torch.float64 else tl.float32)


def coef_tensor(device, dtype, *values) -> torch.Tensor:
    # Scalars travel in a tensor of the accumulation dtype: Triton would round a
    # float argument to float32, which a float64 computation must not see.
    return torch.tensor(values, dtype=dtype, device=device)


def bool_arg(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A bool tensor as the kernel reads it (uint8, same storage); an absent one as
    `placeholder`, a pointer the kernel never dereferences."""
    return placeholder if t is None else t.view(torch.uint8)
