"""The (clipped) value loss in Triton (rlkernels::value_loss_triton), with the same
outputs as the compiled op; the chunking and aggregation are those of
_token_loss.py."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from ..reference.value_loss import VALUE_STATS
from ._common import bool_arg, coef_tensor, on_inputs_device
from ._token_loss import block_t, check_token_loss, empty_batch, finalize, outputs, token_chunk

_VALUE_SLOTS = 3    # loss, tokens, clipped


@triton.jit
def _value_kernel(v_ptr, old_ptr, ret_ptr, m_ptr, grad_ptr, part_ptr, T, n_chunks, coef_ptr,
                  HAS_MASK: tl.constexpr, CLIP: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_T: tl.constexpr, SLOTS: tl.constexpr):
    row, offs, inside, valid = token_chunk(m_ptr, T, n_chunks, HAS_MASK, BLOCK_T)
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


@triton_twin("value_loss")
@on_inputs_device
def value_loss_triton(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                      mask: torch.Tensor | None, coefficients: list[float], agg: str, need_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_token_loss("value_loss", "values", values, {"old_values": old_values, "returns": returns}, mask, agg,
                      coefficients, 4)
    clip, num_tokens, num_seqs, norm_length = coefficients
    B, T = values.shape
    out_dtype, acc, loss, stats, grad, row_scale = outputs(values, len(VALUE_STATS), need_grad)
    if B == 0 or T == 0:
        return empty_batch(B, agg, need_grad, loss, stats, grad, row_scale)
    has_clip = math.isfinite(clip)
    coef = coef_tensor(values.device, out_dtype, clip if has_clip else 0.0)
    block = block_t(T)
    n_chunks = triton.cdiv(T, block)
    partials = torch.empty((B * n_chunks, _VALUE_SLOTS), dtype=out_dtype, device=values.device)
    _value_kernel[(B * n_chunks,)](
        values, old_values, returns, bool_arg(mask, values), grad if need_grad else partials, partials, T, n_chunks,
        coef, HAS_MASK=mask is not None, CLIP=has_clip, NEED_GRAD=need_grad, ACC=acc, BLOCK_T=block,
        SLOTS=_VALUE_SLOTS)
    finalize(partials, B, T, n_chunks, _VALUE_SLOTS, -1, agg, num_tokens, num_seqs, norm_length, out_dtype, acc,
              loss, stats, row_scale)
    return loss, stats, grad, row_scale
