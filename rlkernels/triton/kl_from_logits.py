"""Full-vocabulary KL(pi || pi_ref) from both models' logits in Triton: the
statistics of csrc/core/kl_from_logits.h with online maxima, one program per row
pair of at most _vocab.VOCAB_CHUNK logits, else a (row, chunk) grid and a per-row
merge (the split depends on V only); the backward is a 2-D grid over (row,
vocabulary block).  The grids and why: docs/gpu-kernels.md."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from . import _vocab
from ._common import bool_arg, cast_to, on_inputs_device
from ._vocab import _LOG2E, FLOOR, LOG2E, block_for, readable, row_base, row_offset, vector_width


def _check_kl_pair(op, logits, ref_logits, mask, temperature):
    C.need(logits.dim() >= 1, op, "logits must have a vocabulary dimension")
    C.floating(op, "logits", logits, C.LOGIT_FLOATS)
    C.need(ref_logits.shape == logits.shape and ref_logits.dtype == logits.dtype, op,
           f"ref_logits must have the shape and dtype of logits {tuple(logits.shape)}, got "
           f"{tuple(ref_logits.shape)} {ref_logits.dtype}")
    C.on_device(op, "ref_logits", ref_logits, logits)
    C.optional_mask(op, "mask", mask, logits.shape[:-1], logits)
    C.positive(op, "temperature", temperature)


@triton.jit
def _kl_shift(m):
    """The value a row is centred on: its maximum, or 0 while that is -inf."""
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def _kl_add(a, b, ma, sa, w, mb, sb, scale, inv_t):
    """Adds a block of both rows' float32 logits (-inf where absent) to the running
    statistics of csrc/core/kl_from_logits.h."""
    # w is centred on both maxima (csrc/core/logprobs.h): moving one shifts every term
    new_ma = tl.maximum(ma, tl.max(a, axis=0))
    new_mb = tl.maximum(mb, tl.max(b, axis=0))
    ca = tl.exp2(tl.where((new_ma == ma) | (ma == -float("inf")), 0.0, (ma - new_ma) * scale))
    shift = ((_kl_shift(ma) - _kl_shift(new_ma)) - (_kl_shift(mb) - _kl_shift(new_mb))) * inv_t
    w = tl.where(w == float("inf"), w, ca * (w + tl.where(sa == 0.0, 0.0, sa * shift)))
    sa = sa * ca
    ma = new_ma
    sb = sb * tl.exp2(tl.where((new_mb == mb) | (mb == -float("inf")), 0.0, (mb - new_mb) * scale))
    mb = new_mb
    ya = (a - _kl_shift(ma)) * scale
    yb = (b - _kl_shift(mb)) * scale
    ea = tl.exp2(tl.where(ya < FLOOR, FLOOR, ya))
    eb = tl.exp2(tl.where(yb < FLOOR, FLOOR, yb))
    sa += tl.sum(ea, axis=0)
    sb += tl.sum(eb, axis=0)
    d = ((a - _kl_shift(ma)) - (b - _kl_shift(mb))) * inv_t
    # q_j = 0 < p_j (however small p_j, which may underflow): KL is inf
    ruled_out = (b == -float("inf")) & (a > -float("inf"))
    w += tl.sum(tl.where(ruled_out, float("inf"), tl.where(ea == 0.0, 0.0, ea * d)), axis=0)
    return ma, sa, w, mb, sb


@triton.jit
def _kl_span(a_base, b_base, lo, hi, scale, inv_t, BLOCK: tl.constexpr):
    """The statistics of the row pair's columns [lo, hi), from nothing, in blocks of
    columns (the bits do not depend on where the rows sit: _vocab.span_stats)."""
    ma = tl.zeros([], dtype=tl.float32) - float("inf")
    mb = tl.zeros([], dtype=tl.float32) - float("inf")
    sa = tl.zeros([], dtype=tl.float32)
    sb = tl.zeros([], dtype=tl.float32)
    w = tl.zeros([], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        live = cols < hi
        a = tl.load(a_base + cols, mask=live, other=-float("inf")).to(tl.float32)
        b = tl.load(b_base + cols, mask=live, other=-float("inf")).to(tl.float32)
        ma, sa, w, mb, sb = _kl_add(a, b, ma, sa, w, mb, sb, scale, inv_t)
    return ma, sa, w, mb, sb


@triton.jit
def _kl_finish(row, keep, ma, sa, w, mb, sb, kl_ptr, saved_ptr):
    sa = tl.where(keep, sa, 1.0)
    sb = tl.where(keep, sb, 1.0)
    log_sa = tl.log(sa)
    log_sb = tl.log(sb)
    mean_ratio = w / sa
    kl = mean_ratio - log_sa + log_sb
    tl.store(kl_ptr + row, tl.where(keep, kl, 0.0))
    tl.store(saved_ptr + 5 * row, tl.where(keep, ma, 0.0))
    tl.store(saved_ptr + 5 * row + 1, tl.where(keep, log_sa, 0.0))
    tl.store(saved_ptr + 5 * row + 2, tl.where(keep, mb, 0.0))
    tl.store(saved_ptr + 5 * row + 3, tl.where(keep, log_sb, 0.0))
    tl.store(saved_ptr + 5 * row + 4, tl.where(keep, mean_ratio, 0.0))


@triton.jit
def _kept(mask_ptr, row, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return tl.load(mask_ptr + row) != 0
    return tl.full([], 1, tl.int1)


@triton.jit
def _kl_fwd_kernel(a_ptr, b_ptr, mask_ptr, kl_ptr, saved_ptr, V, inner, outer_stride, inner_stride,
                   b_inner, b_outer_stride, b_inner_stride, scale, inv_t, HAS_MASK: tl.constexpr,
                   BLOCK: tl.constexpr):
    """A row of at most VOCAB_CHUNK logits: one program reads it whole."""
    row = tl.program_id(0).to(tl.int64)
    keep = _kept(mask_ptr, row, HAS_MASK)
    ma, sa, w, mb, sb = _kl_span(row_base(a_ptr, row, inner, outer_stride, inner_stride),
                                 row_base(b_ptr, row, b_inner, b_outer_stride, b_inner_stride), 0,
                                 tl.where(keep, V, 0), scale, inv_t, BLOCK)
    _kl_finish(row, keep, ma, sa, w, mb, sb, kl_ptr, saved_ptr)


@triton.jit
def _kl_chunk_kernel(a_ptr, b_ptr, mask_ptr, part_ptr, V, inner, outer_stride, inner_stride, b_inner, b_outer_stride,
                     b_inner_stride, scale, inv_t, CHUNK: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Grid (row, chunk): (ma, sa, w, mb, sb) of one chunk of a row pair, from nothing."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    lo = chunk * CHUNK
    hi = tl.where(_kept(mask_ptr, row, HAS_MASK), tl.where(lo + CHUNK < V, lo + CHUNK, V), lo)
    ma, sa, w, mb, sb = _kl_span(row_base(a_ptr, row, inner, outer_stride, inner_stride),
                                 row_base(b_ptr, row, b_inner, b_outer_stride, b_inner_stride), lo, hi, scale, inv_t,
                                 BLOCK)
    out = part_ptr + 5 * (row * tl.num_programs(1) + chunk)
    tl.store(out, ma)
    tl.store(out + 1, sa)
    tl.store(out + 2, w)
    tl.store(out + 3, mb)
    tl.store(out + 4, sb)


@triton.jit
def _kl_merge_kernel(mask_ptr, part_ptr, kl_ptr, saved_ptr, K, scale, inv_t, HAS_MASK: tl.constexpr,
                     KB: tl.constexpr):
    """One program per row: its chunks' statistics added at the row's maxima
    (kl_stats_add of csrc/core/kl_from_logits.h) in an order fixed by K, then KL."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KB)
    live = k < K
    part = part_ptr + 5 * (row * K + k)
    mas = tl.load(part, mask=live, other=-float("inf"))
    sas = tl.load(part + 1, mask=live, other=0.0)
    ws = tl.load(part + 2, mask=live, other=0.0)
    mbs = tl.load(part + 3, mask=live, other=-float("inf"))
    sbs = tl.load(part + 4, mask=live, other=0.0)
    ma = tl.max(mas, axis=0)
    mb = tl.max(mbs, axis=0)
    a_in = live & (sas != 0.0)
    ca = tl.exp2(tl.where(a_in, (mas - ma) * scale, 0.0))
    shift = ((mas - ma) - (_kl_shift(mbs) - _kl_shift(mb))) * inv_t
    sa = tl.sum(tl.where(a_in, ca * sas, 0.0), axis=0)
    w = tl.sum(tl.where(a_in, tl.where(ws == float("inf"), ws, ca * (ws + sas * shift)), 0.0), axis=0)
    b_in = live & (sbs != 0.0)
    sb = tl.sum(tl.where(b_in, tl.exp2(tl.where(b_in, (mbs - mb) * scale, 0.0)) * sbs, 0.0), axis=0)
    _kl_finish(row, _kept(mask_ptr, row, HAS_MASK), ma, sa, w, mb, sb, kl_ptr, saved_ptr)


@triton.jit
def _kl_grad_tile(a_ptr, b_ptr, ga_ptr, gb_ptr, offs, a_offs, b_offs, live, keep, g, saved, scale, inv_t,
                  LOGITS_GRAD: tl.constexpr, REF_GRAD: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        a = tl.load(a_ptr + a_offs, mask=live, other=-float("inf")).to(tl.float32)
        b = tl.load(b_ptr + b_offs, mask=live, other=-float("inf")).to(tl.float32)
    else:
        a = tl.load(a_ptr + a_offs).to(tl.float32)
        b = tl.load(b_ptr + b_offs).to(tl.float32)
    ya = (a - tl.load(saved)) * scale - tl.load(saved + 1) * LOG2E
    p = tl.exp2(tl.where(ya < FLOOR, FLOOR, ya))
    if LOGITS_GRAD:
        d = ((a - _kl_shift(tl.load(saved))) - (b - _kl_shift(tl.load(saved + 2)))) * inv_t
        da = tl.where(p == 0.0, 0.0, g * p * (d - tl.load(saved + 4)) * inv_t)
        da = cast_to(tl.where(keep, da, 0.0), ga_ptr.dtype.element_ty)
        if MASKED:
            tl.store(ga_ptr + offs, da, mask=live)
        else:
            tl.store(ga_ptr + offs, da)
    if REF_GRAD:
        yb = (b - tl.load(saved + 2)) * scale - tl.load(saved + 3) * LOG2E
        q = tl.exp2(tl.where(yb < FLOOR, FLOOR, yb))
        db = cast_to(tl.where(keep, g * (q - p) * inv_t, 0.0), gb_ptr.dtype.element_ty)
        if MASKED:
            tl.store(gb_ptr + offs, db, mask=live)
        else:
            tl.store(gb_ptr + offs, db)


@triton.jit
def _kl_bwd_kernel(a_ptr, b_ptr, mask_ptr, g_ptr, saved_ptr, ga_ptr, gb_ptr, V, inner, outer_stride, inner_stride,
                   b_inner, b_outer_stride, b_inner_stride, scale, inv_t, HAS_MASK: tl.constexpr,
                   LOGITS_GRAD: tl.constexpr, REF_GRAD: tl.constexpr, SAME: tl.constexpr, BLOCK: tl.constexpr,
                   VEC: tl.constexpr):
    """Grid (row, tile) over the contiguous gradients, tiles at 16-byte boundaries as
    logprobs' backward (inner tiles unmasked, whole vectors); SAME: both logits rows
    are laid out as the gradients'."""
    row = tl.program_id(0).to(tl.int64)
    start = row * V
    lo = tl.multiple_of(start - start % VEC + tl.program_id(1).to(tl.int64) * BLOCK, VEC)
    offs = lo + tl.arange(0, BLOCK)
    cols = offs - start
    live = (cols >= 0) & (cols < V)
    if SAME:
        a_offs = offs
        b_offs = offs
    else:
        a_offs = row_offset(row, inner, outer_stride, inner_stride) + cols
        b_offs = row_offset(row, b_inner, b_outer_stride, b_inner_stride) + cols
    g = tl.load(g_ptr + row)
    keep = _kept(mask_ptr, row, HAS_MASK)
    saved = saved_ptr + 5 * row
    if (lo >= start) & (lo + BLOCK <= start + V):
        _kl_grad_tile(a_ptr, b_ptr, ga_ptr, gb_ptr, offs, a_offs, b_offs, live, keep, g, saved, scale, inv_t,
                      LOGITS_GRAD, REF_GRAD, False)
    else:
        _kl_grad_tile(a_ptr, b_ptr, ga_ptr, gb_ptr, offs, a_offs, b_offs, live, keep, g, saved, scale, inv_t,
                      LOGITS_GRAD, REF_GRAD, True)


@triton_twin("kl_from_logits")
@on_inputs_device
def kl_from_logits_triton(logits: torch.Tensor, ref_logits: torch.Tensor, mask: Optional[torch.Tensor],
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kl_pair("kl_from_logits", logits, ref_logits, mask, temperature)
    a, (inner, outer_stride, inner_stride) = readable(logits)
    b, (b_inner, b_outer_stride, b_inner_stride) = readable(ref_logits)
    lead = logits.shape[:-1]
    V = logits.shape[-1]
    N = math.prod(lead)
    kl = torch.empty(lead, dtype=torch.float32, device=logits.device)
    saved = torch.empty((*lead, 5), dtype=torch.float32, device=logits.device)
    if N == 0:
        return kl, saved
    scale, inv_t = _LOG2E / temperature, 1.0 / temperature
    rows = (inner, outer_stride, inner_stride, b_inner, b_outer_stride, b_inner_stride)
    common = dict(HAS_MASK=mask is not None)
    mask_arg = bool_arg(mask, kl)
    K = _vocab.chunks(V)
    if K == 1:
        _kl_fwd_kernel[(N,)](a, b, mask_arg, kl, saved, V, *rows, scale, inv_t, BLOCK=block_for(V, 2048), **common)
        return kl, saved
    chunk = _vocab.VOCAB_CHUNK
    parts = torch.empty((N, K, 5), dtype=torch.float32, device=logits.device)
    _kl_chunk_kernel[(N, K)](a, b, mask_arg, parts, V, *rows, scale, inv_t, CHUNK=chunk,
                             BLOCK=block_for(chunk, 2048), **common)
    _kl_merge_kernel[(N,)](mask_arg, parts, kl, saved, K, scale, inv_t, HAS_MASK=mask is not None,
                           KB=triton.next_power_of_2(K))
    return kl, saved


@triton_twin("kl_from_logits_backward")
@on_inputs_device
def kl_from_logits_backward_triton(grad_kl: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor,
                                   mask: Optional[torch.Tensor], saved: torch.Tensor, temperature: float,
                                   logits_grad: bool, ref_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kl_pair("kl_from_logits_backward", logits, ref_logits, mask, temperature)
    C.row_floats("kl_from_logits_backward", "grad_kl", grad_kl, logits, 1)
    C.row_floats("kl_from_logits_backward", "saved", saved, logits, 5)
    a, (inner, outer_stride, inner_stride) = readable(logits)
    b, (b_inner, b_outer_stride, b_inner_stride) = readable(ref_logits)
    V = logits.shape[-1]
    N = math.prod(logits.shape[:-1])
    grad_logits = logits.new_empty(logits.shape if logits_grad else (0,))
    grad_ref = logits.new_empty(logits.shape if ref_grad else (0,))
    if N > 0 and V > 0 and (logits_grad or ref_grad):
        block = block_for(V, 2048)  # as logprobs' backward: registers of the two paths
        vec = vector_width(a)
        dense = (N, N * V, V)  # the gradients' rows: contiguous [N, V]
        same = (inner, outer_stride, inner_stride) == (b_inner, b_outer_stride, b_inner_stride) == dense
        _kl_bwd_kernel[(N, triton.cdiv(V + vec - 1, block))](
            a, b, bool_arg(mask, grad_kl), grad_kl, saved,
            grad_logits if logits_grad else saved, grad_ref if ref_grad else saved, V, inner, outer_stride,
            inner_stride, b_inner, b_outer_stride, b_inner_stride, _LOG2E / temperature, 1.0 / temperature,
            HAS_MASK=mask is not None, LOGITS_GRAD=logits_grad, REF_GRAD=ref_grad, SAME=same, BLOCK=block, VEC=vec)
    return grad_logits, grad_ref
