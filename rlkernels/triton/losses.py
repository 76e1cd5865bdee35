"""Token-level losses in Triton (rlkernels::policy_loss_triton, value_loss_triton):
the same outputs as the compiled ops.  One program per (row, chunk of BLOCK_T
tokens) computes the per-token loss and gradient and stores the chunk's partial
sums; one finalising program turns those into the loss, the per-row gradient
scales (the aggregation of csrc/core/loss_agg.h) and the statistics."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import custom_op, register_fake

from ..ops import _losses
from ..reference.losses import POLICY_STATS, VALUE_STATS
from . import _checks as C
from ._common import acc_types, bool_arg, coef_tensor, on_inputs_device

_AGG_CODES = {"token-mean": 0, "token-sum": 1, "seq-mean-token-sum": 2, "seq-mean-token-mean": 3,
              "seq-mean-token-sum-norm": 4}
_KL_CODES = {"none": 0, "k1": 1, "k2": 2, "k3": 3}
_POLICY_SLOTS = 10  # loss, tokens, clip upper/lower/dual, k1, k3, ratio sum, ratio max, ref KL
_POLICY_MAX_SLOT = 8
_VALUE_SLOTS = 3    # loss, tokens, clipped
_SLOT_PAD = 16


@triton.jit
def _token_chunk(m_ptr, T, n_chunks, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
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
def _policy_kernel(lp_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, m_ptr, grad_ptr, part_ptr, T, n_chunks, coef_ptr,
                   HAS_MASK: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ADV_PER_ROW: tl.constexpr,
                   KL: tl.constexpr, HAS_DUAL: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_T: tl.constexpr, SLOTS: tl.constexpr):
    row, offs, inside, valid = _token_chunk(m_ptr, T, n_chunks, HAS_MASK, BLOCK_T)
    # Select, never multiply: NaN or inf in masked slots must not reach the sums.
    lp = tl.where(valid, tl.load(lp_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
    old = tl.where(valid, tl.load(old_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
    if ADV_PER_ROW:
        adv = tl.where(valid, tl.load(adv_ptr + row).to(ACC), 0.0)
    else:
        adv = tl.where(valid, tl.load(adv_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
    ratio_low = tl.load(coef_ptr)
    ratio_high = tl.load(coef_ptr + 1)
    dual_clip = tl.load(coef_ptr + 2)
    clamp = tl.load(coef_ptr + 3)
    kl_coef = tl.load(coef_ptr + 4)

    raw = lp - old
    pass_through = (raw >= -clamp) & (raw <= clamp)
    # Clamps written as selects: a NaN log-prob must stay NaN (a GPU's max/min drop it).
    log_ratio = tl.where(raw < -clamp, -clamp, tl.where(raw > clamp, clamp, raw))
    ratio = tl.exp(log_ratio)
    clipped = tl.where(ratio < ratio_low, ratio_low, tl.where(ratio > ratio_high, ratio_high, ratio))
    unclipped_loss = -adv * ratio
    clipped_loss = -adv * clipped
    clip_wins = clipped_loss > unclipped_loss
    loss = tl.where(clip_wins, clipped_loss, unclipped_loss)
    slope = tl.where(clip_wins, 0.0, -adv)
    negative = adv < 0.0
    capped = tl.zeros([BLOCK_T], dtype=tl.int1)
    if HAS_DUAL:
        cap = -adv * dual_clip
        capped = negative & (loss > cap)
        tie = negative & (loss == cap)
        loss = tl.where(capped, cap, loss)
        slope = tl.where(capped, 0.0, tl.where(tie, 0.5 * slope, slope))
    grad = tl.where(slope == 0.0, 0.0, slope * ratio) * tl.where(pass_through, 1.0, 0.0)
    if HAS_WEIGHTS:
        w = tl.where(valid, tl.load(w_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
        loss = w * loss
        grad = w * grad
    kl = tl.zeros([BLOCK_T], dtype=ACC)
    if KL != 0:
        ref = tl.where(valid, tl.load(ref_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
        diff = lp - ref
        if KL == 1:
            kl = diff
            dkl = tl.full([BLOCK_T], 1.0, ACC)
        elif KL == 2:
            kl = 0.5 * diff * diff
            dkl = diff
        else:
            e = tl.exp(-diff)
            kl = e + diff - 1.0
            dkl = 1.0 - e
        loss = loss + kl_coef * kl
        grad = grad + kl_coef * dkl
    if NEED_GRAD:
        tl.store(grad_ptr + offs, tl.where(valid, grad, 0.0).to(ACC), mask=inside)
    one = tl.where(valid, 1.0, 0.0).to(ACC)
    base = part_ptr + tl.program_id(0).to(tl.int64) * SLOTS
    tl.store(base + 0, tl.sum(tl.where(valid, loss, 0.0).to(ACC), axis=0))
    tl.store(base + 1, tl.sum(one, axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid & (adv > 0.0) & (ratio > ratio_high), 1.0, 0.0).to(ACC), axis=0))
    tl.store(base + 3, tl.sum(tl.where(valid & negative & (ratio < ratio_low), 1.0, 0.0).to(ACC), axis=0))
    tl.store(base + 4, tl.sum(tl.where(valid & capped, 1.0, 0.0).to(ACC), axis=0))
    tl.store(base + 5, tl.sum(tl.where(valid, -log_ratio, 0.0).to(ACC), axis=0))
    tl.store(base + 6, tl.sum(tl.where(valid, ratio - 1.0 - log_ratio, 0.0).to(ACC), axis=0))
    tl.store(base + 7, tl.sum(tl.where(valid, ratio, 0.0).to(ACC), axis=0))
    tl.store(base + 8, tl.max(tl.where(valid, ratio, 0.0).to(ACC), axis=0))
    tl.store(base + 9, tl.sum(tl.where(valid, kl, 0.0).to(ACC), axis=0))


@triton.jit
def _value_kernel(v_ptr, old_ptr, ret_ptr, m_ptr, grad_ptr, part_ptr, T, n_chunks, coef_ptr,
                  HAS_MASK: tl.constexpr, CLIP: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_T: tl.constexpr, SLOTS: tl.constexpr):
    row, offs, inside, valid = _token_chunk(m_ptr, T, n_chunks, HAS_MASK, BLOCK_T)
    value = tl.where(valid, tl.load(v_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
    ret = tl.where(valid, tl.load(ret_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
    err = value - ret
    sq = err * err
    loss = 0.5 * sq
    grad = err
    clipped_flag = tl.zeros([BLOCK_T], dtype=ACC)
    if CLIP:
        clip = tl.load(coef_ptr)
        old = tl.where(valid, tl.load(old_ptr + offs, mask=inside, other=0.0).to(ACC), 0.0)
        delta = value - old
        active = (delta < -clip) | (delta > clip)
        err_clipped = old + tl.where(delta < 0.0, -clip, clip) - ret
        sq_clipped = err_clipped * err_clipped
        clip_wins = active & (sq_clipped > sq)
        tie = active & (sq_clipped == sq)
        clipped_nan = sq_clipped != sq_clipped  # a NaN old value: max() must keep it
        loss = 0.5 * tl.where(clip_wins | clipped_nan, sq_clipped, sq)
        grad = tl.where(clipped_nan, sq_clipped, tl.where(clip_wins, 0.0, tl.where(tie, 0.5 * err, err)))
        clipped_flag = tl.where(clip_wins, 1.0, 0.0).to(ACC)
    if NEED_GRAD:
        tl.store(grad_ptr + offs, tl.where(valid, grad, 0.0).to(ACC), mask=inside)
    base = part_ptr + tl.program_id(0).to(tl.int64) * SLOTS
    tl.store(base + 0, tl.sum(tl.where(valid, loss, 0.0).to(ACC), axis=0))
    tl.store(base + 1, tl.sum(tl.where(valid, 1.0, 0.0).to(ACC), axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid, clipped_flag, 0.0).to(ACC), axis=0))


@triton.jit
def _finalize_kernel(part_ptr, row_scale_ptr, loss_ptr, stats_ptr, B, n_chunks, coef_ptr,
                     SLOTS: tl.constexpr, SLOT_PAD: tl.constexpr, MAX_SLOT: tl.constexpr, AGG: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: sums the chunk partials per row, applies agg (csrc/core/loss_agg.h)."""
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


def _block_t(T: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(T, 1))))


def _token_warps(block: int) -> int:
    # 4 tokens a thread at most: with 8 (4 warps over 1024 tokens) the policy kernel
    # spilled registers on sm_80 (.ci/triton_aot.py)
    return max(4, min(8, block // 128))


def _finalize(partials, B, T, n_chunks, slots, max_slot, agg, num_tokens, num_seqs, norm_length, out_dtype, acc,
              loss, stats, row_scale):
    coef = torch.tensor([num_tokens, num_seqs, float(T) if norm_length < 0 else norm_length],
                        dtype=out_dtype, device=partials.device)
    _finalize_kernel[(1,)](partials, row_scale, loss, stats, B, n_chunks, coef, SLOTS=slots, SLOT_PAD=_SLOT_PAD,
                           MAX_SLOT=max_slot, AGG=_AGG_CODES[agg], ACC=acc, BLOCK_B=64)


def _outputs(like: torch.Tensor, num_stats: int, need_grad: bool):
    out_dtype, acc = acc_types(like.dtype)
    B, T = like.shape
    dev = like.device
    loss = torch.zeros((), dtype=out_dtype, device=dev)
    stats = torch.zeros((num_stats,), dtype=out_dtype, device=dev)
    grad = torch.empty((B, T) if need_grad else (0,), dtype=out_dtype, device=dev)
    row_scale = torch.zeros((B,), dtype=out_dtype, device=dev)
    return out_dtype, acc, loss, stats, grad, row_scale


def _empty_batch(B, agg, need_grad, loss, stats, grad, row_scale):
    """The outputs of a token loss over no tokens."""
    if B > 0 and agg == "token-sum":
        row_scale.fill_(1.0)
    if need_grad:
        grad.zero_()
    return loss, stats, grad, row_scale


def _check_token_loss(op, primary_name, primary, companions, mask, agg, coefficients, num_coefficients,
                      per_row=()):
    """The twin of check_token_loss (csrc/args/losses.h): a [B, T] primary, companions
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


@custom_op("rlkernels::policy_loss_triton", mutates_args=())
@on_inputs_device
def policy_loss_triton(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor | None, weights: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                       coefficients: list[float], kl: str, agg: str, need_grad: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_token_loss("policy_loss", "logprobs", logprobs,
                      {"old_logprobs": old_logprobs, "advantages": advantages, "weights": weights,
                       "ref_logprobs": ref_logprobs}, mask, agg, coefficients, 8, per_row=("advantages",))
    C.known("policy_loss", "kl estimator", kl, _KL_CODES)
    C.need(kl == "none" or ref_logprobs is not None, "policy_loss", "a KL estimator needs ref_logprobs")
    clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, num_tokens, num_seqs, norm_length = coefficients
    B, T = logprobs.shape
    out_dtype, acc, loss, stats, grad, row_scale = _outputs(logprobs, len(POLICY_STATS), need_grad)
    if B == 0 or T == 0:
        return _empty_batch(B, agg, need_grad, loss, stats, grad, row_scale)
    has_dual = math.isfinite(dual_clip)
    coef = coef_tensor(logprobs.device, out_dtype, 1.0 - clip_low, 1.0 + clip_high, dual_clip if has_dual else 1.0,
                        log_ratio_clamp, kl_coef)
    block = _block_t(T)
    n_chunks = triton.cdiv(T, block)
    partials = torch.empty((B * n_chunks, _POLICY_SLOTS), dtype=out_dtype, device=logprobs.device)
    _policy_kernel[(B * n_chunks,)](
        logprobs, old_logprobs, advantages, weights if weights is not None else logprobs,
        ref_logprobs if ref_logprobs is not None else logprobs, bool_arg(mask, logprobs),
        grad if need_grad else partials, partials, T, n_chunks, coef,
        HAS_MASK=mask is not None, HAS_WEIGHTS=weights is not None, ADV_PER_ROW=advantages.dim() == 1,
        KL=_KL_CODES[kl], HAS_DUAL=has_dual, NEED_GRAD=need_grad, ACC=acc, BLOCK_T=block, SLOTS=_POLICY_SLOTS,
        num_warps=_token_warps(block))
    _finalize(partials, B, T, n_chunks, _POLICY_SLOTS, _POLICY_MAX_SLOT, agg, num_tokens, num_seqs, norm_length,
              out_dtype, acc, loss, stats, row_scale)
    return loss, stats, grad, row_scale


@custom_op("rlkernels::value_loss_triton", mutates_args=())
@on_inputs_device
def value_loss_triton(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                      mask: torch.Tensor | None, coefficients: list[float], agg: str, need_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_token_loss("value_loss", "values", values, {"old_values": old_values, "returns": returns}, mask, agg,
                      coefficients, 4)
    clip, num_tokens, num_seqs, norm_length = coefficients
    B, T = values.shape
    out_dtype, acc, loss, stats, grad, row_scale = _outputs(values, len(VALUE_STATS), need_grad)
    if B == 0 or T == 0:
        return _empty_batch(B, agg, need_grad, loss, stats, grad, row_scale)
    has_clip = math.isfinite(clip)
    coef = coef_tensor(values.device, out_dtype, clip if has_clip else 0.0)
    block = _block_t(T)
    n_chunks = triton.cdiv(T, block)
    partials = torch.empty((B * n_chunks, _VALUE_SLOTS), dtype=out_dtype, device=values.device)
    _value_kernel[(B * n_chunks,)](
        values, old_values, returns, bool_arg(mask, values), grad if need_grad else partials, partials, T, n_chunks,
        coef, HAS_MASK=mask is not None, CLIP=has_clip, NEED_GRAD=need_grad, ACC=acc, BLOCK_T=block,
        SLOTS=_VALUE_SLOTS)
    _finalize(partials, B, T, n_chunks, _VALUE_SLOTS, -1, agg, num_tokens, num_seqs, norm_length, out_dtype, acc,
              loss, stats, row_scale)
    return loss, stats, grad, row_scale


@custom_op("rlkernels::scale_rows_triton", mutates_args=())
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
        block = _block_t(T)
        _scale_rows_kernel[(B, triton.cdiv(T, block))](grad, row_scale, grad_loss.to(grad.dtype).reshape(1), out, T,
                                                        BLOCK_T=block)
    return out.to(dtype)


@register_fake("rlkernels::scale_rows_triton")
def _scale_rows_triton_fake(grad, row_scale, grad_loss, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


@register_fake("rlkernels::policy_loss_triton")
def _policy_loss_triton_fake(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients, kl, agg,
                             need_grad):
    return _losses.fake_outputs(logprobs, len(POLICY_STATS), need_grad)


@register_fake("rlkernels::value_loss_triton")
def _value_loss_triton_fake(values, old_values, returns, mask, coefficients, agg, need_grad):
    return _losses.fake_outputs(values, len(VALUE_STATS), need_grad)


_losses.register_token_loss_autograd("rlkernels::policy_loss_triton", 10, torch.ops.rlkernels.scale_rows_triton,
                                      public_name="ppo_loss/grpo_loss")
_losses.register_token_loss_autograd("rlkernels::value_loss_triton", 7, torch.ops.rlkernels.scale_rows_triton)
