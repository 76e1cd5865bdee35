"""The clipped policy-gradient loss in Triton (rlkernels::policy_loss_triton), with
the same outputs as the compiled op; the chunking and aggregation are those of
_token_loss.py."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from ..reference.policy_loss import POLICY_STATS
from . import _checks as C
from ._common import bool_arg, coef_tensor, on_inputs_device
from ._token_loss import block_t, check_token_loss, empty_batch, finalize, outputs, token_chunk, token_warps

_KL_CODES = {"none": 0, "k1": 1, "k2": 2, "k3": 3}
_POLICY_SLOTS = 10  # loss, tokens, clip upper/lower/dual, k1, k3, ratio sum, ratio max, ref KL
_POLICY_MAX_SLOT = 8


@triton.jit
def _policy_kernel(lp_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, m_ptr, grad_ptr, part_ptr, T, n_chunks, coef_ptr,
                   HAS_MASK: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ADV_PER_ROW: tl.constexpr,
                   KL: tl.constexpr, HAS_DUAL: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_T: tl.constexpr, SLOTS: tl.constexpr):
    row, offs, inside, valid = token_chunk(m_ptr, T, n_chunks, HAS_MASK, BLOCK_T)
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


@triton_twin("policy_loss")
@on_inputs_device
def policy_loss_triton(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor | None, weights: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                       coefficients: list[float], kl: str, agg: str, need_grad: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_token_loss("policy_loss", "logprobs", logprobs,
                      {"old_logprobs": old_logprobs, "advantages": advantages, "weights": weights,
                       "ref_logprobs": ref_logprobs}, mask, agg, coefficients, 8, per_row=("advantages",))
    C.known("policy_loss", "kl estimator", kl, _KL_CODES)
    C.need(kl == "none" or ref_logprobs is not None, "policy_loss", "a KL estimator needs ref_logprobs")
    clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, num_tokens, num_seqs, norm_length = coefficients
    B, T = logprobs.shape
    out_dtype, acc, loss, stats, grad, row_scale = outputs(logprobs, len(POLICY_STATS), need_grad)
    if B == 0 or T == 0:
        return empty_batch(B, agg, need_grad, loss, stats, grad, row_scale)
    has_dual = math.isfinite(dual_clip)
    coef = coef_tensor(logprobs.device, out_dtype, 1.0 - clip_low, 1.0 + clip_high, dual_clip if has_dual else 1.0,
                        log_ratio_clamp, kl_coef)
    block = block_t(T)
    n_chunks = triton.cdiv(T, block)
    partials = torch.empty((B * n_chunks, _POLICY_SLOTS), dtype=out_dtype, device=logprobs.device)
    _policy_kernel[(B * n_chunks,)](
        logprobs, old_logprobs, advantages, weights if weights is not None else logprobs,
        ref_logprobs if ref_logprobs is not None else logprobs, bool_arg(mask, logprobs),
        grad if need_grad else partials, partials, T, n_chunks, coef,
        HAS_MASK=mask is not None, HAS_WEIGHTS=weights is not None, ADV_PER_ROW=advantages.dim() == 1,
        KL=_KL_CODES[kl], HAS_DUAL=has_dual, NEED_GRAD=need_grad, ACC=acc, BLOCK_T=block, SLOTS=_POLICY_SLOTS,
        num_warps=token_warps(block))
    finalize(partials, B, T, n_chunks, _POLICY_SLOTS, _POLICY_MAX_SLOT, agg, num_tokens, num_seqs, norm_length,
              out_dtype, acc, loss, stats, row_scale)
    return loss, stats, grad, row_scale
