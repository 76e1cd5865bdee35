"""Masked statistics in Triton: row means (one program per row) and whitening (one
program: two reductions and a write pass)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, bool_arg, coef_tensor, on_inputs_device

_BLOCK = 128


@triton.jit
def _row_mean_kernel(x_ptr, m_ptr, out_ptr, C, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=ACC)
    count = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, C, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < C
        valid = live
        if HAS_MASK:
            valid = live & (tl.load(m_ptr + row * C + offs, mask=live, other=0) != 0)
        x = tl.load(x_ptr + row * C + offs, mask=valid, other=0.0).to(ACC)
        total += tl.where(valid, x, 0.0)
        count += tl.where(valid, 1.0, 0.0)
    n = tl.sum(count, axis=0)
    tl.store(out_ptr + row, tl.where(n > 0, tl.sum(total, axis=0) / tl.maximum(n, 1.0), 0.0))


@triton_twin("masked_row_mean")
@on_inputs_device
def masked_row_mean_triton(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    R, cols = C.rows("masked_row_mean", "x", x)
    C.optional_mask("masked_row_mean", "mask", mask, (R, cols), x)
    out_dtype, acc = acc_types(x.dtype)
    out = torch.empty(R, dtype=out_dtype, device=x.device)
    if R > 0:
        _row_mean_kernel[(R,)](x, bool_arg(mask, x), out, cols,
                               HAS_MASK=mask is not None, ACC=acc, BLOCK=_BLOCK)
    return out


@triton.jit
def _valid(m_ptr, offs, n, HAS_MASK: tl.constexpr):
    """Lanes inside [0, n) whose mask entry is 1 (all inside lanes without a mask)."""
    inside = offs < n
    if HAS_MASK:
        return inside & (tl.load(m_ptr + offs, mask=inside, other=0) != 0)
    return inside


@triton.jit
def _whiten_kernel(x_ptr, m_ptr, out_ptr, N, coef_ptr, SHIFT_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    eps = tl.load(coef_ptr)
    total = tl.zeros([BLOCK], dtype=ACC)
    count = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = _valid(m_ptr, offs, N, HAS_MASK)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
        total += tl.where(valid, x, 0.0)
        count += tl.where(valid, 1.0, 0.0)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = _valid(m_ptr, offs, N, HAS_MASK)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
        sq += tl.where(valid, (x - mean) * (x - mean), 0.0)
    var = tl.where(n > 1.0, tl.sum(sq, axis=0) / tl.maximum(n - 1.0, 1.0), 0.0)
    inv_std = 1.0 / tl.sqrt(var + eps)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < N
        valid = _valid(m_ptr, offs, N, HAS_MASK)
        x = tl.load(x_ptr + offs, mask=live, other=0.0).to(ACC)
        y = (x - mean) * inv_std
        if not SHIFT_MEAN:
            y = y + mean
        tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=live)


@triton_twin("masked_whiten")
@on_inputs_device
def masked_whiten_triton(x: torch.Tensor, mask: torch.Tensor | None, shift_mean: bool, eps: float) -> torch.Tensor:
    C.need(x.is_contiguous(), "masked_whiten", "x must be contiguous")
    C.floating("masked_whiten", "x", x)
    C.optional_mask("masked_whiten", "mask", mask, x.shape, x)
    out_dtype, acc = acc_types(x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() > 0:
        _whiten_kernel[(1,)](x, bool_arg(mask, x), out, x.numel(),
                             coef_tensor(x.device, out_dtype, eps), SHIFT_MEAN=shift_mean,
                             HAS_MASK=mask is not None, ACC=acc, BLOCK=1024)
    return out
