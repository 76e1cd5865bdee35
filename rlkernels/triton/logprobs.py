"""Log-probs, entropy and full-vocabulary KL from logits in Triton.

Forward: one program per row, streaming the vocabulary in blocks with an online
maximum and base-2 sums (the same statistics as csrc/core/logprobs.h).  Backward:
a 2-D grid (row, vocabulary block), each program recomputing p for its block
from the saved row statistics.  Registered with torch.library.custom_op (opaque
ops with fake kernels) so they behave the same under TRITON_INTERPRET=1."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op, register_fake

from ..ops.kl_from_logits import register_autograd as register_kl_autograd
from ..ops.logprobs import _fake_vocab_tile, register_autograd as register_logprobs_autograd
from . import _checks as C
from ._common import bool_arg, cast_to, on_inputs_device

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


def _check_kl_pair(op, logits, ref_logits, mask, temperature):
    C.need(logits.dim() >= 1, op, "logits must have a vocabulary dimension")
    C.floating(op, "logits", logits, C.LOGIT_FLOATS)
    C.need(ref_logits.shape == logits.shape and ref_logits.dtype == logits.dtype, op,
           f"ref_logits must have the shape and dtype of logits {tuple(logits.shape)}, got "
           f"{tuple(ref_logits.shape)} {ref_logits.dtype}")
    C.on_device(op, "ref_logits", ref_logits, logits)
    C.optional_mask(op, "mask", mask, logits.shape[:-1], logits)
    C.positive(op, "temperature", temperature)


@custom_op("rlkernels::logprobs_triton", mutates_args=())
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


@custom_op("rlkernels::logprobs_backward_triton", mutates_args=())
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


@custom_op("rlkernels::logprobs_backward_inplace_triton", mutates_args=("logits",))
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


@register_fake("rlkernels::logprobs_triton")
def _logprobs_triton_fake(logits, labels, temperature, ignore_index, with_entropy, inplace_backward):
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=torch.float32),
            logits.new_empty(lead if with_entropy else (0,), dtype=torch.float32),
            logits.new_empty((*lead, 2), dtype=torch.float32))


@register_fake("rlkernels::logprobs_backward_triton")
def _logprobs_backward_triton_fake(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature,
                                   ignore_index, vocab_start=0):
    return logits.new_empty(logits.shape)


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
        # (4096 spilled on sm_80/sm_90 with entropy: .ci/triton_aot.py)
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


@custom_op("rlkernels::logprobs_vocab_tile_triton", mutates_args=("state",))
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


register_fake("rlkernels::logprobs_vocab_tile_triton")(_fake_vocab_tile)


# ---- KL(pi || pi_ref) ----------------------------------------------------------------------------

@triton.jit
def _kl_shift(m):
    """The value a row is centred on: its maximum, or 0 while that is -inf."""
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def _kl_fwd_kernel(a_ptr, b_ptr, mask_ptr, kl_ptr, saved_ptr, V, inner, outer_stride, inner_stride,
                   b_inner, b_outer_stride, b_inner_stride, scale, inv_t, HAS_MASK: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_base = _row_base(a_ptr, row, inner, outer_stride, inner_stride)
    b_base = _row_base(b_ptr, row, b_inner, b_outer_stride, b_inner_stride)
    n = V
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
        n = tl.where(keep, V, 0)
    else:
        keep = True
    ma = tl.zeros([], dtype=tl.float32) - float("inf")
    mb = tl.zeros([], dtype=tl.float32) - float("inf")
    sa = tl.zeros([], dtype=tl.float32)
    sb = tl.zeros([], dtype=tl.float32)
    w = tl.zeros([], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        live = cols < V
        a = tl.load(a_base + cols, mask=live, other=-float("inf")).to(tl.float32)
        b = tl.load(b_base + cols, mask=live, other=-float("inf")).to(tl.float32)
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
def _kl_bwd_kernel(a_ptr, b_ptr, mask_ptr, g_ptr, saved_ptr, ga_ptr, gb_ptr, V, inner, outer_stride, inner_stride,
                   b_inner, b_outer_stride, b_inner_stride, scale, inv_t, HAS_MASK: tl.constexpr,
                   LOGITS_GRAD: tl.constexpr, REF_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < V
    a = tl.load(_row_base(a_ptr, row, inner, outer_stride, inner_stride) + cols, mask=live,
                other=-float("inf")).to(tl.float32)
    b = tl.load(_row_base(b_ptr, row, b_inner, b_outer_stride, b_inner_stride) + cols, mask=live,
                other=-float("inf")).to(tl.float32)
    g = tl.load(g_ptr + row)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    else:
        keep = True
    ya = (a - tl.load(saved_ptr + 5 * row)) * scale - tl.load(saved_ptr + 5 * row + 1) * LOG2E
    p = tl.exp2(tl.where(ya < FLOOR, FLOOR, ya))
    if LOGITS_GRAD:
        d = ((a - _kl_shift(tl.load(saved_ptr + 5 * row))) - (b - _kl_shift(tl.load(saved_ptr + 5 * row + 2)))) * inv_t
        da = tl.where(p == 0.0, 0.0, g * p * (d - tl.load(saved_ptr + 5 * row + 4)) * inv_t)
        da = tl.where(keep, da, 0.0)
        tl.store(ga_ptr + row * V + cols, cast_to(da, ga_ptr.dtype.element_ty), mask=live)
    if REF_GRAD:
        yb = (b - tl.load(saved_ptr + 5 * row + 2)) * scale - tl.load(saved_ptr + 5 * row + 3) * LOG2E
        q = tl.exp2(tl.where(yb < FLOOR, FLOOR, yb))
        tl.store(gb_ptr + row * V + cols, cast_to(tl.where(keep, g * (q - p) * inv_t, 0.0), gb_ptr.dtype.element_ty), mask=live)


@custom_op("rlkernels::kl_from_logits_triton", mutates_args=())
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
    if N > 0:
        _kl_fwd_kernel[(N,)](a, b, bool_arg(mask, kl), kl, saved, V, inner,
                             outer_stride, inner_stride, b_inner, b_outer_stride, b_inner_stride,
                             _LOG2E / temperature, 1.0 / temperature, HAS_MASK=mask is not None,
                             BLOCK=min(_block(V), 2048))
    return kl, saved


@custom_op("rlkernels::kl_from_logits_backward_triton", mutates_args=())
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
        block = _block(V)
        _kl_bwd_kernel[(N, triton.cdiv(V, block))](
            a, b, bool_arg(mask, grad_kl), grad_kl, saved,
            grad_logits if logits_grad else saved, grad_ref if ref_grad else saved, V, inner, outer_stride,
            inner_stride, b_inner, b_outer_stride, b_inner_stride, _LOG2E / temperature, 1.0 / temperature,
            HAS_MASK=mask is not None, LOGITS_GRAD=logits_grad, REF_GRAD=ref_grad, BLOCK=block)
    return grad_logits, grad_ref


@register_fake("rlkernels::kl_from_logits_triton")
def _kl_triton_fake(logits, ref_logits, mask, temperature):
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=torch.float32), logits.new_empty((*lead, 5), dtype=torch.float32)


@register_fake("rlkernels::kl_from_logits_backward_triton")
def _kl_backward_triton_fake(grad_kl, logits, ref_logits, mask, saved, temperature, logits_grad, ref_grad):
    return (logits.new_empty(logits.shape if logits_grad else (0,)),
            logits.new_empty(logits.shape if ref_grad else (0,)))


# Autograd of the Triton ops: the same formulas as the compiled ops, with the
# Triton backward kernels.
register_logprobs_autograd("rlkernels::logprobs_triton", torch.ops.rlkernels.logprobs_backward_triton,
                           torch.ops.rlkernels.logprobs_backward_inplace_triton)
register_kl_autograd("rlkernels::kl_from_logits_triton", torch.ops.rlkernels.kl_from_logits_backward_triton)
