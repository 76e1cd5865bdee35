"""What the Triton token-level losses (policy_loss, value_loss) share: one program
per (row, chunk of BLOCK_T tokens) computes the per-token loss and gradient and
stores the chunk's partial sums; one finalising program here turns those into the
loss, the per-row gradient scales (the aggregation of csrc/core/token_loss.h) and the
statistics.  Also the scale_rows twin, the backward of both losses."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, coef_tensor, on_inputs_device

_AGG_CODES = {"token-mean": 0, "token-sum": 1, "seq-mean-token-sum": 2, "seq-mean-token-mean": 3,
              "seq-mean-token-sum-norm": 4}
_SLOT_PAD = 16


@triton.jit
def token_chunk(m_ptr, T, n_chunks, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's row, flat offsets of its chunk of tokens, which lie inside the
    row, and which of those are valid under the mask."""
    pid = tl.program_id(0)
    row = pid // n_chunks
    cols = (pid % n_chunks) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < T
    offs = row.to(tl.int64) * T + cols
    valid = inside
    if HAS_MASK:
        valid = valid & (tl.load(m_ptr + offs, mask=inside, other=0) != 0)
    return row, offs, inside, valid


@triton.jit
def _finalize_kernel(part_ptr, row_scale_ptr, loss_ptr, stats_ptr, B, n_chunks, coef_ptr,
                     SLOTS: tl.constexpr, SLOT_PAD: tl.constexpr, MAX_SLOT: tl.constexpr, AGG: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: sums the chunk partials per row, applies agg (csrc/core/token_loss.h)."""
    slots = tl.arange(0, SLOT_PAD)
    slot_ok = slots < SLOTS
    is_max = slots == MAX_SLOT
    totals = tl.zeros([SLOT_PAD], dtype=ACC)
    seqs = tl.zeros([BLOCK_B], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        tile = tl.zeros([BLOCK_B, SLOT_PAD], dtype=ACC)
        for c in range(0, n_chunks):
            ptrs = part_ptr + ((rows.to(tl.int64) * n_chunks + c) * SLOTS)[:, None] + slots[None, :]
            x = tl.load(ptrs, mask=row_ok[:, None] & slot_ok[None, :], other=0.0)
            tile = tl.where(is_max[None, :], tl.maximum(tile, x), tile + x)
        totals = tl.where(is_max, tl.maximum(totals, tl.max(tile, axis=0)), totals + tl.sum(tile, axis=0))
        row_tokens = tl.sum(tl.where(slots[None, :] == 1, tile, 0.0), axis=1)
        seqs += tl.where(row_ok & (row_tokens > 0), 1.0, 0.0)
    # The maximum skips NaN; slot MAX_SLOT - 1 sums the same values and keeps it (core/token_loss.h).
    summed = tl.sum(tl.where(slots == MAX_SLOT - 1, totals, 0.0), axis=0)
    totals = tl.where(is_max, tl.where(summed != summed, summed, totals), totals)
    counted_tokens = tl.sum(tl.where(slots == 1, totals, 0.0), axis=0)
    counted_seqs = tl.sum(seqs, axis=0)
    given_tokens = tl.load(coef_ptr)
    given_seqs = tl.load(coef_ptr + 1)
    norm_length = tl.load(coef_ptr + 2)
    n_t = tl.where(given_tokens >= 0, given_tokens, counted_tokens)
    n_s = tl.where(given_seqs >= 0, given_seqs, counted_seqs)
    loss = tl.zeros([BLOCK_B], dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        row_loss = tl.zeros([BLOCK_B], dtype=ACC)
        row_tokens = tl.zeros([BLOCK_B], dtype=ACC)
        for c in range(0, n_chunks):
            base = part_ptr + (rows.to(tl.int64) * n_chunks + c) * SLOTS
            row_loss += tl.load(base, mask=row_ok, other=0.0)
            row_tokens += tl.load(base + 1, mask=row_ok, other=0.0)
        if AGG == 0:
            denom = n_t + tl.zeros([BLOCK_B], dtype=ACC)
        elif AGG == 1:
            denom = tl.full([BLOCK_B], 1.0, ACC)
        elif AGG == 2:
            denom = n_s + tl.zeros([BLOCK_B], dtype=ACC)
        elif AGG == 3:
            denom = row_tokens * n_s
        else:
            denom = n_s * norm_length + tl.zeros([BLOCK_B], dtype=ACC)
        scale = tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0).to(ACC)
        tl.store(row_scale_ptr + rows, scale, mask=row_ok)
        loss += tl.where(row_ok, scale * row_loss, 0.0)
    tl.store(loss_ptr, tl.sum(loss, axis=0))
    means = tl.where(is_max, totals, tl.where(counted_tokens > 0, totals / tl.maximum(counted_tokens, 1.0), 0.0))
    # stats: slots 2.. as means (max for MAX_SLOT), then the token count
    stat_slots = slots + 2
    tl.store(stats_ptr + slots, tl.sum(tl.where(stat_slots[:, None] == slots[None, :], means[None, :], 0.0), axis=1),
             mask=stat_slots < SLOTS)
    tl.store(stats_ptr + (SLOTS - 2), counted_tokens)


@triton.jit
def _scale_rows_kernel(g_ptr, s_ptr, gl_ptr, out_ptr, T, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < T
    offs = row.to(tl.int64) * T + cols
    scale = tl.load(gl_ptr) * tl.load(s_ptr + row)
    tl.store(out_ptr + offs, tl.load(g_ptr + offs, mask=inside, other=0.0) * scale, mask=inside)


def block_t(T: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(T, 1))))


def token_warps(block: int) -> int:
    # 4 tokens a thread at most: 8 spill the policy kernel's registers (.ci/triton_aot.py)
    return max(4, min(8, block // 128))


def finalize(partials, B, T, n_chunks, slots, max_slot, agg, num_tokens, num_seqs, norm_length, out_dtype, acc,
              loss, stats, row_scale):
    coef = coef_tensor(partials.device, out_dtype, num_tokens, num_seqs, float(T) if norm_length < 0 else norm_length)
    _finalize_kernel[(1,)](partials, row_scale, loss, stats, B, n_chunks, coef, SLOTS=slots, SLOT_PAD=_SLOT_PAD,
                           MAX_SLOT=max_slot, AGG=_AGG_CODES[agg], ACC=acc, BLOCK_B=64)


def outputs(like: torch.Tensor, num_stats: int, need_grad: bool):
    out_dtype, acc = acc_types(like.dtype)
    B, T = like.shape
    dev = like.device
    loss = torch.zeros((), dtype=out_dtype, device=dev)
    stats = torch.zeros((num_stats,), dtype=out_dtype, device=dev)
    grad = torch.empty((B, T) if need_grad else (0,), dtype=out_dtype, device=dev)
    row_scale = torch.zeros((B,), dtype=out_dtype, device=dev)
    return out_dtype, acc, loss, stats, grad, row_scale


def empty_batch(B, agg, need_grad, loss, stats, grad, row_scale):
    """The outputs of a token loss over no tokens."""
    if B > 0 and agg == "token-sum":
        row_scale.fill_(1.0)
    if need_grad:
        grad.zero_()
    return loss, stats, grad, row_scale


def check_token_loss(op, primary_name, primary, companions, mask, agg, coefficients, num_coefficients,
                      per_row=()):
    """The twin of token_loss_args (csrc/args/token_loss.h): a [B, T] primary, companions
    of its shape and dtype ([B] allowed for the names in per_row), a bool mask."""
    B, T = C.rows(op, primary_name, primary)
    for name, t in companions.items():
        if t is None:
            continue
        shape = (B,) if name in per_row and t.dim() == 1 else (B, T)
        C.shaped(op, name, t, shape, primary, primary.dtype)
    C.optional_mask(op, "mask", mask, (B, T), primary)
    C.known(op, "agg", agg, _AGG_CODES)
    C.need(len(coefficients) == num_coefficients, op,
           f"takes {num_coefficients} coefficients, got {len(coefficients)}")
    return B, T


@triton_twin("scale_rows")
@on_inputs_device
def scale_rows_triton(grad: torch.Tensor, row_scale: torch.Tensor, grad_loss: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    B, T = C.rows("scale_rows", "grad", grad)
    C.shaped("scale_rows", "row_scale", row_scale, (B,), grad, grad.dtype)
    C.need(grad_loss.numel() == 1, "scale_rows", "grad_loss must hold one value")
    C.on_device("scale_rows", "grad_loss", grad_loss, grad)
    C.need(grad.dtype == C.acc_of(dtype), "scale_rows", f"grad must be {C.acc_of(dtype)}, got {grad.dtype}")
    # Scaled in the accumulation dtype, rounded by torch (the interpreter truncates bfloat16).
    out = torch.empty((B, T), dtype=grad.dtype, device=grad.device)
    if B > 0 and T > 0:
        block = block_t(T)
        _scale_rows_kernel[(B, triton.cdiv(T, block))](grad, row_scale, grad_loss.to(grad.dtype).reshape(1), out, T,
                                                        BLOCK_T=block)
    return out.to(dtype)
