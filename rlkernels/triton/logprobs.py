"""Log-probs and entropy from logits in Triton.

Forward: the softmax statistics of csrc/core/logprobs.h (online maximum, base-2
sums), one program per row when it holds at most _vocab.VOCAB_CHUNK logits, else a
(row, chunk) grid writing each chunk's statistics and a per-row merge (the split
depends on V only: batch invariant).  Backward: a 2-D grid (row, vocabulary block),
each program recomputing p for its block from the saved row statistics.  The grids
and why: docs/gpu-kernels.md."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from . import _vocab
from ._common import cast_to, on_inputs_device
from ._vocab import (_LOG2E, FLOOR, LN2, LOG2E, block_for, merge_parts, readable, row_base, row_index, row_offset,
                     span_stats, vector_width)


@triton.jit
def _finish_row(base, row, label, ignored, m, s, t, V, lp_ptr, ent_ptr, saved_ptr, inv_t, ENTROPY: tl.constexpr):
    """Writes a row's log-prob, entropy and saved (m, ln s) from its statistics."""
    log_s = tl.log(tl.where(ignored, 1.0, s))
    # an out-of-range label is never used as an address; its log-prob is NaN
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(base + tl.where(in_range, label, 0), mask=in_range & ~ignored, other=0.0).to(tl.float32)
    lp = tl.where(in_range, (x_label - m) * inv_t - log_s, float("nan"))
    tl.store(lp_ptr + row, tl.where(ignored, 0.0, lp))
    if ENTROPY:
        tl.store(ent_ptr + row, tl.where(ignored, 0.0, log_s - LN2 * t / tl.where(ignored, 1.0, s)))
    tl.store(saved_ptr + 2 * row, tl.where(ignored, 0.0, m))
    tl.store(saved_ptr + 2 * row + 1, tl.where(ignored, 0.0, log_s))


@triton.jit
def _logprobs_fwd_kernel(x_ptr, labels_ptr, lp_ptr, ent_ptr, saved_ptr, V, inner, outer_stride, inner_stride,
                         ignore_index, scale, inv_t, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """A row of at most VOCAB_CHUNK logits: one program reads it whole."""
    row = tl.program_id(0).to(tl.int64)
    start = row_offset(row, inner, outer_stride, inner_stride)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    t = tl.zeros([], dtype=tl.float32)
    m, s, t = span_stats(x_ptr + start, 0, tl.where(ignored, 0, V), m, s, t, scale, ENTROPY, BLOCK)
    _finish_row(x_ptr + start, row, label, ignored, m, s, t, V, lp_ptr, ent_ptr, saved_ptr, inv_t, ENTROPY)


@triton.jit
def _logprobs_chunk_kernel(x_ptr, labels_ptr, part_ptr, V, inner, outer_stride, inner_stride, ignore_index, scale,
                           CHUNK: tl.constexpr, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (row, chunk): the (m, s, t) of one chunk of a row, from nothing."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    start = row_offset(row, inner, outer_stride, inner_stride)
    ignored = tl.load(labels_ptr + row) == ignore_index
    lo = chunk * CHUNK
    hi = tl.where(ignored, lo, tl.where(lo + CHUNK < V, lo + CHUNK, V))
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    t = tl.zeros([], dtype=tl.float32)
    m, s, t = span_stats(x_ptr + start, lo, hi, m, s, t, scale, ENTROPY, BLOCK)
    out = part_ptr + 3 * (row * tl.num_programs(1) + chunk)
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, t)


@triton.jit
def _logprobs_merge_kernel(x_ptr, labels_ptr, part_ptr, lp_ptr, ent_ptr, saved_ptr, V, K, inner, outer_stride,
                           inner_stride, ignore_index, scale, inv_t, ENTROPY: tl.constexpr, KB: tl.constexpr):
    """One program per row: its chunks' statistics merged, then the outputs."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    m, s, t = merge_parts(part_ptr + 3 * K * row, K, scale, ENTROPY, KB)
    _finish_row(row_base(x_ptr, row, inner, outer_stride, inner_stride), row, label, label == ignore_index, m, s, t,
                V, lp_ptr, ent_ptr, saved_ptr, inv_t, ENTROPY)


@triton.jit
def _grad_tile(x_ptr, out_ptr, offs, o_offs, cols, live, label, g, row, gh_ptr, ent_ptr, m, log2_s, ignore_index,
               vocab_start, scale, inv_t, ENTROPY: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(x_ptr + offs, mask=live, other=-float("inf")).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
    y = (x - m) * scale - log2_s
    y = tl.where(y < FLOOR, FLOOR, y)
    p = tl.exp2(y)
    if ENTROPY:
        d = -p * (g + tl.load(gh_ptr + row) * (y * LN2 + tl.load(ent_ptr + row)))
    else:
        d = -p * g
    d = (d + tl.where(cols + vocab_start == label, g, 0.0)) * inv_t
    d = tl.where(label < 0, float("nan"), d)  # no tile holds a negative label: flag the row
    d = tl.where(label == ignore_index, 0.0, d)
    d = cast_to(d, out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_ptr + o_offs, d, mask=live)
    else:
        tl.store(out_ptr + o_offs, d)


@triton.jit
def _logprobs_bwd_kernel(x_ptr, out_ptr, labels_ptr, g_ptr, gh_ptr, ent_ptr, saved_ptr, V,
                         inner, outer_stride, inner_stride, o_inner, o_outer_stride, o_inner_stride,
                         ignore_index, vocab_start, scale, inv_t, ENTROPY: tl.constexpr, SAME: tl.constexpr,
                         BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Grid (row, tile).  Tiles start at 16-byte boundaries of memory, not of the row,
    so that the tiles inside the row read and write whole vectors without a mask
    (a row of odd length starts anywhere); the row's two edge tiles are masked."""
    row = tl.program_id(0).to(tl.int64)
    start = row_offset(row, inner, outer_stride, inner_stride)
    lo = tl.multiple_of(start - start % VEC + tl.program_id(1).to(tl.int64) * BLOCK, VEC)
    offs = lo + tl.arange(0, BLOCK)
    cols = offs - start
    if SAME:
        o_offs = offs
    else:
        o_offs = row_offset(row, o_inner, o_outer_stride, o_inner_stride) + cols
    live = (cols >= 0) & (cols < V)
    label = tl.load(labels_ptr + row)
    g = tl.load(g_ptr + row)
    m = tl.load(saved_ptr + 2 * row)
    log2_s = tl.load(saved_ptr + 2 * row + 1) * LOG2E
    if (lo >= start) & (lo + BLOCK <= start + V):
        _grad_tile(x_ptr, out_ptr, offs, o_offs, cols, live, label, g, row, gh_ptr, ent_ptr, m, log2_s, ignore_index,
                   vocab_start, scale, inv_t, ENTROPY, False)
    else:
        _grad_tile(x_ptr, out_ptr, offs, o_offs, cols, live, label, g, row, gh_ptr, ent_ptr, m, log2_s, ignore_index,
                   vocab_start, scale, inv_t, ENTROPY, True)


def _check_backward(op, grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, vocab_start):
    """The twin of check_logprobs_backward (csrc/args/logprobs.h)."""
    C.labels(op, logits, labels)
    C.positive(op, "temperature", temperature)
    C.need(vocab_start >= 0, op, f"vocab_start must be >= 0, got {vocab_start}")
    C.row_floats(op, "grad_logprobs", grad_logprobs, logits, 1)
    C.row_floats(op, "saved", saved, logits, 2)
    if grad_entropy is not None:
        C.row_floats(op, "grad_entropy", grad_entropy, logits, 1)
        C.row_floats(op, "entropy", entropy, logits, 1)


@triton_twin("logprobs")
@on_inputs_device
def logprobs_triton(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                    with_entropy: bool, inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C.labels("logprobs", logits, labels)
    C.positive("logprobs", "temperature", temperature)
    x, (inner, outer_stride, inner_stride) = readable(logits)
    lead = logits.shape[:-1]
    V = logits.shape[-1]
    N = math.prod(lead)
    f32 = dict(dtype=torch.float32, device=logits.device)
    values = torch.empty(lead, **f32)
    entropies = torch.empty(lead if with_entropy else (0,), **f32)
    saved = torch.empty((*lead, 2), **f32)
    if N == 0:
        return values, entropies, saved
    scale, inv_t = _LOG2E / temperature, 1.0 / temperature
    common = dict(ENTROPY=with_entropy)
    K = _vocab.chunks(V)
    ent_out = entropies if with_entropy else values
    if K == 1:
        _logprobs_fwd_kernel[(N,)](x, labels, values, ent_out, saved, V, inner, outer_stride, inner_stride,
                                   ignore_index, scale, inv_t, BLOCK=block_for(V), **common)
        return values, entropies, saved
    chunk = _vocab.VOCAB_CHUNK
    parts = torch.empty((N, K, 3), **f32)
    _logprobs_chunk_kernel[(N, K)](x, labels, parts, V, inner, outer_stride, inner_stride, ignore_index, scale,
                                   CHUNK=chunk, BLOCK=block_for(chunk, 2048), **common)
    _logprobs_merge_kernel[(N,)](x, labels, parts, values, ent_out, saved, V, K, inner, outer_stride, inner_stride,
                                 ignore_index, scale, inv_t, KB=triton.next_power_of_2(K), ENTROPY=with_entropy)
    return values, entropies, saved


def _backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropies, temperature, ignore_index,
                   vocab_start, out):
    x, (inner, outer_stride, inner_stride) = readable(logits)
    o_inner, o_outer_stride, o_inner_stride = row_index(out)
    V = logits.shape[-1]
    N = math.prod(logits.shape[:-1])
    if N == 0 or V == 0:
        return
    with_entropy = grad_entropy is not None
    # 2048: the two paths (whole vectors inside the row, masked at its edges) of a
    # 4096-wide tile took 254 registers on sm_90
    block = block_for(V, 2048)
    vec = vector_width(x)
    # one tile more where the row's first vector starts before it (cdiv over V + VEC - 1)
    _logprobs_bwd_kernel[(N, triton.cdiv(V + vec - 1, block))](
        x, out, labels, grad_logprobs, grad_entropy if with_entropy else grad_logprobs,
        entropies if with_entropy else grad_logprobs, saved, V, inner, outer_stride, inner_stride,
        o_inner, o_outer_stride, o_inner_stride, ignore_index, vocab_start, _LOG2E / temperature,
        1.0 / temperature, ENTROPY=with_entropy, SAME=(inner, outer_stride, inner_stride) == (o_inner, o_outer_stride,
                                                                                            o_inner_stride),
        BLOCK=block, VEC=vec)


@triton_twin("logprobs_backward")
@on_inputs_device
def logprobs_backward_triton(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor], logits: torch.Tensor,
                             labels: torch.Tensor, saved: torch.Tensor, entropy: torch.Tensor, temperature: float,
                             ignore_index: int, vocab_start: int = 0) -> torch.Tensor:
    _check_backward("logprobs_backward", grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature,
                    vocab_start)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                   vocab_start, out)
    return out


@triton_twin("logprobs_backward_inplace")
@on_inputs_device
def logprobs_backward_inplace_triton(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                                     logits: torch.Tensor, labels: torch.Tensor, saved: torch.Tensor,
                                     entropy: torch.Tensor, temperature: float, ignore_index: int,
                                     vocab_start: int = 0) -> None:
    _check_backward("logprobs_backward_inplace", grad_logprobs, grad_entropy, logits, labels, saved, entropy,
                    temperature, vocab_start)
    if row_index(logits) is not None:
        _backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                       vocab_start, logits)
    else:
        logits.copy_(logprobs_backward_triton(grad_logprobs, grad_entropy, logits, labels, saved, entropy,
                                              temperature, ignore_index, vocab_start))


# ---- one vocabulary tile of rows (linear_logprobs) ------------------------------------------------

@triton.jit
def _any_at_least(base, n, bound, BLOCK: tl.constexpr):
    """Whether any of the row's logits [0, n) is >= bound."""
    found = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n, other=-float("inf")).to(tl.float32)
        found = tl.maximum(found, tl.max(((x >= bound) & (cols < n)).to(tl.int32), axis=0))
    return found != 0


@triton.jit
def _vocab_tile_kernel(x_ptr, labels_ptr, state_ptr, V, inner, outer_stride, inner_stride, ignore_index, vocab_start,
                       scale, inv_t, ENTROPY: tl.constexpr, FINISH: tl.constexpr, TOP1: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Merges the tile's statistics into the row's state (m, s, t, label logit); with
    FINISH the state becomes (log p, H, m, ln s), as csrc/core/logprobs.h's tile_stats_out.
    With TOP1 a fifth value per row is the arg-max flag of tile_top1_next there."""
    row = tl.program_id(0).to(tl.int64)
    start = row_offset(row, inner, outer_stride, inner_stride)
    base = x_ptr + start
    out = state_ptr + (5 if TOP1 else 4) * row
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    first = vocab_start == 0  # the first tile starts from nothing (the state may be uninitialised)
    m = tl.where(first, -float("inf"), tl.load(out))
    s = tl.where(first, 0.0, tl.load(out + 1))
    t = tl.where(first, 0.0, tl.load(out + 2))
    x_label = tl.where(first, 0.0, tl.load(out + 3))
    prev_m = m
    m, s, t = span_stats(base, 0, tl.where(ignored, 0, V), m, s, t, scale, ENTROPY, BLOCK)
    local = label - vocab_start
    in_tile = (local >= 0) & (local < V) & (~ignored)
    x_label = tl.where(in_tile, tl.load(base + tl.where(in_tile, local, 0), mask=in_tile, other=0.0).to(tl.float32),
                       x_label)
    # a label no tile can hold (negative, or past the last tile's end) gives a NaN log-prob
    lost = label < 0
    if FINISH:
        lost = lost | (local >= V)
    x_label = tl.where(lost, float("nan"), x_label)
    if TOP1:
        flag_in = tl.where(first, 0.0, tl.load(out + 4))
        candidate = x_label >= m
        # the columns before the label are read only when its logit is the largest so far
        scan = tl.where(in_tile & candidate, local, 0)
        # a narrower block than the statistics' keeps this scan's registers in budget
        # (the full block spills with entropy: .ci/triton_aot.py)
        earlier = _any_at_least(base, scan, x_label, BLOCK // 4)
        top = candidate & tl.where(in_tile, (prev_m < x_label) & (~earlier), flag_in != 0.0)
        tl.store(out + 4, tl.where(top & (~ignored), 1.0, 0.0))
    if FINISH:
        log_s = tl.log(tl.where(ignored, 1.0, s))
        lp = (x_label - m) * inv_t - log_s
        tl.store(out, tl.where(ignored, 0.0, lp))
        if ENTROPY:
            tl.store(out + 1, tl.where(ignored, 0.0, log_s - LN2 * t / tl.where(ignored, 1.0, s)))
        else:
            tl.store(out + 1, 0.0)
        tl.store(out + 2, tl.where(ignored, 0.0, m))
        tl.store(out + 3, tl.where(ignored, 0.0, log_s))
    else:
        tl.store(out, tl.where(ignored, 0.0, m))
        tl.store(out + 1, tl.where(ignored, 0.0, s))
        tl.store(out + 2, tl.where(ignored, 0.0, t))
        tl.store(out + 3, tl.where(ignored, 0.0, x_label))


@triton_twin("logprobs_vocab_tile")
@on_inputs_device
def logprobs_vocab_tile_triton(logits: torch.Tensor, labels: torch.Tensor, state: torch.Tensor, temperature: float,
                               ignore_index: int, vocab_start: int, with_entropy: bool, finish: bool) -> None:
    op = "logprobs_vocab_tile"
    C.labels(op, logits, labels)
    N = math.prod(logits.shape[:-1])
    top1 = N > 0 and state.numel() == 5 * N  # a fifth value per row: whether the label is the arg-max
    C.row_floats(op, "state", state, logits, 5 if top1 else 4)
    C.positive(op, "temperature", temperature)
    C.need(vocab_start >= 0, op, f"vocab_start must be >= 0, got {vocab_start}")
    x, (inner, outer_stride, inner_stride) = readable(logits)
    V = logits.shape[-1]
    if N > 0:
        _vocab_tile_kernel[(N,)](x, labels, state, V, inner, outer_stride, inner_stride, ignore_index, vocab_start,
                                 _LOG2E / temperature, 1.0 / temperature, ENTROPY=bool(with_entropy),
                                 FINISH=bool(finish), TOP1=top1, BLOCK=block_for(V))
