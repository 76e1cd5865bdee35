"""Rows of logits in Triton: addressing, the softmax statistics of a span of a row
read in aligned vectors, and the fixed vocabulary split shared by the log-prob and
KL forwards (docs/gpu-kernels.md).

Statistics (csrc/core/logprobs.h): with scale = log2(e) / T and m the largest raw
logit, s = sum 2^y and t = sum y 2^y, y = (x - m) * scale."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _library

# Jitted code may read a module global only when it is a tl.constexpr (compiled Triton
# rejects plain Python floats; the interpreter does not, which is why .ci/triton_aot.py
# compiles every kernel for real GPUs).  Host code uses the plain floats.
_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
FLOOR = tl.constexpr(-160.0)  # exp2 below this is 0 in float32; keeps 0 * y finite at y = -inf

# A row longer than this is reduced as fixed chunks of VOCAB_CHUNK logits (the last
# one shorter), one program each, whose statistics a second kernel merges.  The split
# depends on V alone, never on the number of rows, so a row's result is the same in
# any batch (the CUDA kernels split the same way).  Read at each call: tests lower it
# to reach the split path at interpreter-sized vocabularies.
VOCAB_CHUNK = _library.VOCAB_CHUNK


def chunks(V: int) -> int:
    """How many chunks a row of V logits is reduced in (1: one program per row)."""
    return max(1, triton.cdiv(V, VOCAB_CHUNK))


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


def block_for(V: int, limit: int = 4096) -> int:
    return max(16, min(limit, triton.next_power_of_2(max(V, 1))))


def vector_width(t: torch.Tensor) -> int:
    """Elements in one 16-byte load: the alignment the backward's tiles start at."""
    return max(1, 16 // t.element_size())


@triton.jit
def row_offset(row, inner, outer_stride, inner_stride):
    """Element offset of a row's first logit (int64)."""
    return (row // inner) * outer_stride + (row % inner) * inner_stride


@triton.jit
def row_base(ptr, row, inner, outer_stride, inner_stride):
    return ptr + row_offset(row, inner, outer_stride, inner_stride)


@triton.jit
def stats_add(x, m, s, t, scale, ENTROPY: tl.constexpr):
    """Adds a block of float32 logits (-inf where absent) to the running (m, s, t)."""
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
def span_stats(base, lo, hi, m, s, t, scale, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Adds the row's logits at columns [lo, hi) (base: its first logit) to (m, s, t),
    in blocks of BLOCK columns from lo.  The blocks follow the columns, not the
    addresses: a row's sums are the same bits wherever it sits in memory (a row alone,
    in a batch, packed or padded), at the cost of scalar loads where a row of odd V
    starts off a 16-byte boundary (docs/gpu-kernels.md)."""
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        block = tl.load(base + cols, mask=cols < hi, other=-float("inf")).to(tl.float32)
        m, s, t = stats_add(block, m, s, t, scale, ENTROPY)
    return m, s, t


@triton.jit
def merge_parts(part_ptr, K, scale, ENTROPY: tl.constexpr, KB: tl.constexpr):
    """The row statistics from its K chunks' (m, s, t) at part_ptr (3 floats each),
    every chunk rescaled to the row's maximum and summed in a fixed order that
    depends on K alone.  A NaN maximum (a NaN logit) makes s NaN."""
    k = tl.arange(0, KB)
    live = k < K
    ms = tl.load(part_ptr + 3 * k, mask=live, other=-float("inf"))
    ss = tl.load(part_ptr + 3 * k + 1, mask=live, other=0.0)
    m = tl.max(ms, axis=0)
    dy = tl.where(ms == -float("inf"), 0.0, (ms - m) * scale)
    c = tl.exp2(dy)
    s = tl.sum(tl.where(live, c * ss, 0.0), axis=0)
    t = tl.zeros([], dtype=tl.float32)
    if ENTROPY:
        ts = tl.load(part_ptr + 3 * k + 2, mask=live, other=0.0)
        t = tl.sum(tl.where(live, c * (ts + dy * ss), 0.0), axis=0)
    return m, s, t
