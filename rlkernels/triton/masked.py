"""Masked statistics in Triton: row means (one program per row) and whitening over
the whole tensor: slices of _SLICE entries, one program each, reduce to (count,
mean, squared deviations), one program merges them, and the slices' programs write
the output (docs/gpu-kernels.md)."""
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


# Entries of one program of the statistics and output passes (a power of two, read
# in blocks of min(1024, _SLICE)): the split depends on N alone.  Tests lower it.
_SLICE = 8192


@triton.jit
def _slice_stats_kernel(x_ptr, m_ptr, part_ptr, N, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                        SLICE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (slice,): (count, mean, sum of squared deviations) of the valid entries of
    one slice, the second pass over the slice reading it from cache."""
    lo = tl.program_id(0).to(tl.int64) * SLICE
    total = tl.zeros([BLOCK], dtype=ACC)
    count = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, SLICE, BLOCK):
        offs = lo + start + tl.arange(0, BLOCK)
        valid = _valid(m_ptr, offs, N, HAS_MASK)
        total += tl.where(valid, tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC), 0.0)
        count += tl.where(valid, 1.0, 0.0)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, SLICE, BLOCK):
        offs = lo + start + tl.arange(0, BLOCK)
        valid = _valid(m_ptr, offs, N, HAS_MASK)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
        sq += tl.where(valid, (x - mean) * (x - mean), 0.0)
    out = part_ptr + 3 * tl.program_id(0)
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, tl.sum(sq, axis=0))


@triton.jit
def _slices_merge_kernel(part_ptr, stats_ptr, P, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the slices' statistics merged (Chan et al.: the squared deviations
    of each slice plus its count times its mean's squared distance to the whole mean)
    into (mean, sum of squared deviations / max(count - 1, 1))."""
    count = tl.zeros([BLOCK], dtype=ACC)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, P, BLOCK):
        k = start + tl.arange(0, BLOCK)
        n_k = tl.load(part_ptr + 3 * k, mask=k < P, other=0.0)
        count += n_k
        total += n_k * tl.load(part_ptr + 3 * k + 1, mask=k < P, other=0.0)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, P, BLOCK):
        k = start + tl.arange(0, BLOCK)
        n_k = tl.load(part_ptr + 3 * k, mask=k < P, other=0.0)
        d = tl.load(part_ptr + 3 * k + 1, mask=k < P, other=0.0) - mean
        sq += tl.load(part_ptr + 3 * k + 2, mask=k < P, other=0.0) + tl.where(n_k > 0.0, n_k * d * d, 0.0)
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, tl.sum(sq, axis=0) / tl.maximum(n - 1.0, 1.0))


def mean_and_variance(x: torch.Tensor, mask: torch.Tensor | None, acc) -> torch.Tensor:
    """[mean, unbiased variance] (0 for fewer than two entries) of x's valid entries,
    in the accumulation dtype, from a multi-program pass and a one-program merge."""
    N = x.numel()
    P = triton.cdiv(N, _SLICE)
    parts = torch.empty((P, 3), dtype=x.dtype if x.dtype == torch.float64 else torch.float32, device=x.device)
    stats = torch.empty(2, dtype=parts.dtype, device=x.device)
    _slice_stats_kernel[(P,)](x, bool_arg(mask, x), parts, N, HAS_MASK=mask is not None, ACC=acc, SLICE=_SLICE,
                              BLOCK=min(1024, _SLICE))
    _slices_merge_kernel[(1,)](parts, stats, P, ACC=acc, BLOCK=256)
    return stats


@triton.jit
def _whiten_kernel(x_ptr, m_ptr, out_ptr, stats_ptr, N, coef_ptr, SHIFT_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
                   ACC: tl.constexpr, SLICE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (slice,): the output of one slice from the whole tensor's statistics."""
    mean = tl.load(stats_ptr)
    inv_std = 1.0 / tl.sqrt(tl.load(stats_ptr + 1) + tl.load(coef_ptr))
    lo = tl.program_id(0).to(tl.int64) * SLICE
    for start in range(0, SLICE, BLOCK):
        offs = lo + start + tl.arange(0, BLOCK)
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
        stats = mean_and_variance(x, mask, acc)
        _whiten_kernel[(triton.cdiv(x.numel(), _SLICE),)](
            x, bool_arg(mask, x), out, stats, x.numel(), coef_tensor(x.device, out_dtype, eps),
            SHIFT_MEAN=shift_mean, HAS_MASK=mask is not None, ACC=acc, SLICE=_SLICE, BLOCK=min(1024, _SLICE))
    return out
