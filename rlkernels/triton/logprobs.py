"""Log-probs and entropy from logits in Triton.

Forward: one program per row, streaming the vocabulary in blocks with an online
maximum and base-2 sums (the same statistics as csrc/core/logprobs.h).  Backward:
a 2-D grid (row, vocabulary block), each program recomputing p for its block
from the saved row statistics."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import cast_to, on_inputs_device

# Jitted code may read a module global only when it is a tl.constexpr (compiled Triton
# rejects plain Python floats; the interpreter does not, which is why .ci/triton_aot.py
# compiles every kernel for real GPUs).  Host code uses the plain floats.
_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
FLOOR = tl.constexpr(-160.0)  # exp2 below this is 0 in float32; keeps 0 * y finite at y = -inf


def row_index(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(inner, outer_stride, inner_stride) addressing the rows of a [..., V] tensor
    in place (leading dims merged where strides allow), or None; see csrc/core/rows.h."""
    V = t.shape[-1]
    if 0 in t.shape[:-1]:  # no rows: any layout addresses them (and an empty tensor's strides are arbitrary)
        return 1, V, V
    if V > 1 and t.stride(-1) != 1:
        return None
    dims: list[list[int]] = []  # innermost first: [size, stride]
    for d in range(t.dim() - 2, -1, -1):
        size, stride = t.shape[d], t.stride(d)
        if size == 1:
            continue
        if dims and stride == dims[-1][1] * dims[-1][0]:
            dims[-1][0] *= size
            continue
        if len(dims) == 2:
            return None
        dims.append([size, stride])
    if not dims:
        return 1, V, V
    if len(dims) == 1:
        return dims[0][0], dims[0][1] * dims[0][0], dims[0][1]
    return dims[0][0], dims[1][1], dims[0][1]


def readable(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    index = row_index(t)
    if index is None:
        t = t.contiguous()
        index = row_index(t)
    return t, index


def _block(V: int) -> int:
    return max(16, min(4096, triton.next_power_of_2(max(V, 1))))


@triton.jit
def _row_base(ptr, row, inner, outer_stride, inner_stride):
    return ptr + (row // inner) * outer_stride + (row % inner) * inner_stride


@triton.jit
def _stream_stats(base, V, n, m, s, t, scale, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Adds the row's logits [0, n) (n is V, or 0 to skip the row) to the running
    statistics (m, s, t), BLOCK at a time with an online maximum."""
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        dy = tl.where((new_m == m) | (m == -float("inf")), 0.0, (m - new_m) * scale)
        c = tl.exp2(dy)
        if ENTROPY:
            t = c * (t + dy * s)
        s = s * c
        m = new_m
        shift = tl.where(m == -float("inf"), 0.0, m)
        y = (x - shift) * scale
        y = tl.where(y < FLOOR, FLOOR, y)
        e = tl.exp2(y)
        s += tl.sum(e, axis=0)
        if ENTROPY:
            t += tl.sum(e * y, axis=0)
    return m, s, t


@triton.jit
def _logprobs_fwd_kernel(x_ptr, labels_ptr, lp_ptr, ent_ptr, saved_ptr, V, inner, outer_stride, inner_stride,
                         ignore_index, scale, inv_t, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = _row_base(x_ptr, row, inner, outer_stride, inner_stride)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    n = tl.where(ignored, 0, V)
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    t = tl.zeros([], dtype=tl.float32)
    m, s, t = _stream_stats(base, V, n, m, s, t, scale, ENTROPY, BLOCK)
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
def _logprobs_bwd_kernel(x_ptr, out_ptr, labels_ptr, g_ptr, gh_ptr, ent_ptr, saved_ptr, V,
                         inner, outer_stride, inner_stride, o_inner, o_outer_stride, o_inner_stride,
                         ignore_index, vocab_start, scale, inv_t, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < V
    x = tl.load(_row_base(x_ptr, row, inner, outer_stride, inner_stride) + cols, mask=live,
                other=-float("inf")).to(tl.float32)
    label = tl.load(labels_ptr + row)
    g = tl.load(g_ptr + row)
    m = tl.load(saved_ptr + 2 * row)
    log2_s = tl.load(saved_ptr + 2 * row + 1) * LOG2E
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
    out = _row_base(out_ptr, row, o_inner, o_outer_stride, o_inner_stride)
    tl.store(out + cols, cast_to(d, out_ptr.dtype.element_ty), mask=live)


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
    if N > 0:
        _logprobs_fwd_kernel[(N,)](
            x, labels, values, entropies if with_entropy else values, saved, V, inner, outer_stride, inner_stride,
            ignore_index, _LOG2E / temperature, 1.0 / temperature, ENTROPY=with_entropy, BLOCK=_block(V))
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
    block = _block(V)
    _logprobs_bwd_kernel[(N, triton.cdiv(V, block))](
        x, out, labels, grad_logprobs, grad_entropy if with_entropy else grad_logprobs,
        entropies if with_entropy else grad_logprobs, saved, V, inner, outer_stride, inner_stride,
        o_inner, o_outer_stride, o_inner_stride, ignore_index, vocab_start, _LOG2E / temperature,
        1.0 / temperature, ENTROPY=with_entropy, BLOCK=block)


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
    base = _row_base(x_ptr, row, inner, outer_stride, inner_stride)
    out = state_ptr + (5 if TOP1 else 4) * row
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    first = vocab_start == 0  # the first tile starts from nothing (the state may be uninitialised)
    m = tl.where(first, -float("inf"), tl.load(out))
    s = tl.where(first, 0.0, tl.load(out + 1))
    t = tl.where(first, 0.0, tl.load(out + 2))
    x_label = tl.where(first, 0.0, tl.load(out + 3))
    prev_m = m
    n = tl.where(ignored, 0, V)
    m, s, t = _stream_stats(base, V, n, m, s, t, scale, ENTROPY, BLOCK)
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
                                 FINISH=bool(finish), TOP1=top1, BLOCK=_block(V))
