"""Preference losses in Triton: rlkernels::dpo_loss_triton (one program per block of
pairs), rlkernels::sequence_logprobs_triton (one program per row) and
rlkernels::dpo_sequence_loss_triton (one program per pair: the two fused); the math of
csrc/core/preference.h."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, bool_arg, coef_tensor, on_inputs_device

_KINDS = {"sigmoid": 0, "ipo": 1, "hinge": 2, "robust": 3}


@triton.jit
def _log1p(x):
    # log1p without a libdevice call: log(u) * x / (u - 1) with u = 1 + x corrects
    # the rounding of u (exact for x = 0, where u - 1 = 0).
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x < 0.0, e / (1.0 + e), 1.0 / (1.0 + e))


@triton.jit
def _pair(pc, pr, rc, rr, beta, ls, KIND: tl.constexpr):
    """(loss, d loss / d z) of pairs of sequence log-probs (core/preference.h)."""
    logits = (pc - pr) - (rc - rr)
    z = beta * logits
    if KIND == 0:
        loss = -(1.0 - ls) * _log_sigmoid(z) - ls * _log_sigmoid(-z)
        dlogits = beta * (-(1.0 - ls) * _sigmoid(-z) + ls * _sigmoid(z))
    elif KIND == 3:
        loss = (-(1.0 - ls) * _log_sigmoid(z) + ls * _log_sigmoid(-z)) / (1.0 - 2.0 * ls)
        dlogits = beta * (-(1.0 - ls) * _sigmoid(-z) - ls * _sigmoid(z)) / (1.0 - 2.0 * ls)
    elif KIND == 2:
        margin = 1.0 - z
        loss = tl.where(margin < 0.0, 0.0, margin)  # relu that keeps NaN (tl.maximum need not)
        dlogits = tl.where(margin > 0.0, -beta, 0.0)
    else:
        d = logits - 1.0 / (2.0 * beta)
        loss = d * d
        dlogits = 2.0 * d
    return loss, dlogits


@triton.jit
def _dpo_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, loss_ptr, chosen_ptr, rejected_ptr, dlogits_ptr, B, coef_ptr,
                KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < B
    pc = tl.load(pc_ptr + offs, mask=live, other=0.0).to(ACC)
    pr = tl.load(pr_ptr + offs, mask=live, other=0.0).to(ACC)
    rc = tl.load(rc_ptr + offs, mask=live, other=0.0).to(ACC)
    rr = tl.load(rr_ptr + offs, mask=live, other=0.0).to(ACC)
    beta = tl.load(coef_ptr)
    ls = tl.load(coef_ptr + 1)
    loss, dlogits = _pair(pc, pr, rc, rr, beta, ls, KIND)
    tl.store(loss_ptr + offs, loss.to(ACC), mask=live)
    tl.store(dlogits_ptr + offs, dlogits.to(ACC), mask=live)
    tl.store(chosen_ptr + offs, (beta * (pc - rc)).to(ACC), mask=live)
    tl.store(rejected_ptr + offs, (beta * (pr - rr)).to(ACC), mask=live)


@triton.jit
def _sequence_kernel(x_ptr, m_ptr, out_ptr, count_ptr, T, HAS_MASK: tl.constexpr, AVERAGE: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    total = tl.zeros([BLOCK_T], dtype=ACC)
    count = tl.zeros([BLOCK_T], dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        valid = cols < T
        if HAS_MASK:
            valid = valid & (tl.load(m_ptr + base + cols, mask=cols < T, other=0) != 0)
        x = tl.load(x_ptr + base + cols, mask=cols < T, other=0.0).to(ACC)
        total += tl.where(valid, x, 0.0)
        count += tl.where(valid, 1.0, 0.0)
    s = tl.sum(total, axis=0)
    n = tl.sum(count, axis=0)
    if AVERAGE:
        s = tl.where(n > 0, s / tl.maximum(n, 1.0), 0.0)
    tl.store(out_ptr + row, s)
    tl.store(count_ptr + row, n)


@triton.jit
def _sequence_backward_kernel(g_ptr, m_ptr, n_ptr, out_ptr, T, HAS_MASK: tl.constexpr, AVERAGE: tl.constexpr,
                              BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < T
    offs = row.to(tl.int64) * T + cols
    value = tl.load(g_ptr + row)
    if AVERAGE:
        n = tl.load(n_ptr + row)
        value = tl.where(n > 0, value / tl.maximum(n, 1.0), 0.0)
    out = tl.zeros([BLOCK_T], dtype=value.dtype) + value
    if HAS_MASK:
        out = tl.where(tl.load(m_ptr + offs, mask=inside, other=0) != 0, out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _row_sums(x_ptr, r_ptr, m_ptr, base, T, HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
    """The masked sums of one row of policy and of reference token log-probs (one mask
    read for both) and the row's count of valid tokens."""
    total = tl.zeros([BLOCK_T], dtype=ACC)
    ref_total = tl.zeros([BLOCK_T], dtype=ACC)
    count = tl.zeros([BLOCK_T], dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        inside = cols < T
        valid = inside
        if HAS_MASK:
            valid = valid & (tl.load(m_ptr + base + cols, mask=inside, other=0) != 0)
        x = tl.load(x_ptr + base + cols, mask=inside, other=0.0).to(ACC)
        r = tl.load(r_ptr + base + cols, mask=inside, other=0.0).to(ACC)
        total += tl.where(valid, x, 0.0)
        ref_total += tl.where(valid, r, 0.0)
        count += tl.where(valid, 1.0, 0.0)
    return tl.sum(total, axis=0), tl.sum(ref_total, axis=0), tl.sum(count, axis=0)


@triton.jit
def _dpo_sequence_kernel(x_ptr, r_ptr, m_ptr, loss_ptr, chosen_ptr, rejected_ptr, coef_out_ptr, B, T, coef_ptr,
                         KIND: tl.constexpr, HAS_MASK: tl.constexpr, AVERAGE: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    pair = tl.program_id(0)
    chosen_base = pair.to(tl.int64) * T
    rejected_base = (pair + B).to(tl.int64) * T
    pc, rc, nc = _row_sums(x_ptr, r_ptr, m_ptr, chosen_base, T, HAS_MASK, ACC, BLOCK_T)
    pr, rr, nr = _row_sums(x_ptr, r_ptr, m_ptr, rejected_base, T, HAS_MASK, ACC, BLOCK_T)
    if AVERAGE:
        pc = tl.where(nc > 0, pc / tl.maximum(nc, 1.0), 0.0)
        rc = tl.where(nc > 0, rc / tl.maximum(nc, 1.0), 0.0)
        pr = tl.where(nr > 0, pr / tl.maximum(nr, 1.0), 0.0)
        rr = tl.where(nr > 0, rr / tl.maximum(nr, 1.0), 0.0)
    beta = tl.load(coef_ptr)
    ls = tl.load(coef_ptr + 1)
    loss, dlogits = _pair(pc, pr, rc, rr, beta, ls, KIND)
    coef_chosen = dlogits
    coef_rejected = -dlogits
    if AVERAGE:  # sequence_coef: through the row's mean, 0 for a row without valid tokens
        coef_chosen = tl.where(nc > 0, dlogits / tl.maximum(nc, 1.0), 0.0)
        coef_rejected = tl.where(nr > 0, -dlogits / tl.maximum(nr, 1.0), 0.0)
    tl.store(loss_ptr + pair, loss.to(ACC))
    tl.store(chosen_ptr + pair, (beta * (pc - rc)).to(ACC))
    tl.store(rejected_ptr + pair, (beta * (pr - rr)).to(ACC))
    tl.store(coef_out_ptr + pair, coef_chosen.to(ACC))
    tl.store(coef_out_ptr + B + pair, coef_rejected.to(ACC))


@triton.jit
def _dpo_sequence_backward_kernel(g_ptr, g_stride, c_ptr, m_ptr, out_ptr, B, T, scale_ptr, HAS_MASK: tl.constexpr,
                                  BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < T
    offs = row.to(tl.int64) * T + cols
    pair = tl.where(row < B, row, row - B)
    value = tl.load(scale_ptr) * tl.load(g_ptr + pair.to(tl.int64) * g_stride) * tl.load(c_ptr + row)
    out = tl.zeros([BLOCK_T], dtype=value.dtype) + value
    if HAS_MASK:
        out = tl.where(tl.load(m_ptr + offs, mask=inside, other=0) != 0, out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton_twin("dpo_sequence_loss")
@on_inputs_device
def dpo_sequence_loss_triton(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None,
                             beta: float, kind: str, label_smoothing: float, average: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "dpo_sequence_loss"
    rows, T = C.rows(op, "policy_logprobs", policy_logprobs)
    C.need(rows % 2 == 0, op, f"policy_logprobs must have an even number of rows, got {rows}")
    C.shaped(op, "ref_logprobs", ref_logprobs, (rows, T), policy_logprobs, policy_logprobs.dtype)
    C.optional_mask(op, "mask", mask, (rows, T), policy_logprobs)
    C.known(op, "preference loss kind", kind, _KINDS)
    out_dtype, acc = acc_types(policy_logprobs.dtype)
    B = rows // 2
    device = policy_logprobs.device
    outs = [torch.empty((B,), dtype=out_dtype, device=device) for _ in range(3)]
    coef_out = torch.empty((rows,), dtype=out_dtype, device=device)
    if B > 0:
        coef = coef_tensor(device, out_dtype, beta, label_smoothing)
        block = max(16, min(1024, triton.next_power_of_2(max(T, 1))))
        _dpo_sequence_kernel[(B,)](policy_logprobs, ref_logprobs, bool_arg(mask, policy_logprobs), *outs, coef_out,
                                   B, T, coef, KIND=_KINDS[kind], HAS_MASK=mask is not None, AVERAGE=average,
                                   ACC=acc, BLOCK_T=block)
    return (*outs, coef_out)


@triton_twin("dpo_sequence_loss_backward")
@on_inputs_device
def dpo_sequence_loss_backward_triton(grad_losses: torch.Tensor, mask: torch.Tensor | None, coef: torch.Tensor,
                                      scale: float, T: int, dtype: torch.dtype) -> torch.Tensor:
    op = "dpo_sequence_loss_backward"
    C.need(grad_losses.dim() == 1, op, f"grad_losses must be [B], got shape {tuple(grad_losses.shape)}")
    B = grad_losses.shape[0]
    C.need(grad_losses.dtype == C.acc_of(dtype), op, f"grad_losses must be {C.acc_of(dtype)}, got {grad_losses.dtype}")
    C.need(T >= 0, op, f"T must be >= 0, got {T}")
    C.shaped(op, "coef", coef, (2 * B,), grad_losses, grad_losses.dtype)
    C.optional_mask(op, "mask", mask, (2 * B, T), grad_losses)
    # 16-bit gradients are rounded by torch (round to nearest even), as in sequence_logprobs_backward.
    out = torch.empty((2 * B, T), dtype=grad_losses.dtype, device=grad_losses.device)
    if B > 0 and T > 0:
        block = max(16, min(1024, triton.next_power_of_2(T)))
        scale_arg = coef_tensor(grad_losses.device, grad_losses.dtype, scale)
        _dpo_sequence_backward_kernel[(2 * B, triton.cdiv(T, block))](
            grad_losses, grad_losses.stride(0), coef, bool_arg(mask, grad_losses), out, B, T, scale_arg,
            HAS_MASK=mask is not None, BLOCK_T=block)
    return out.to(dtype)


@triton_twin("dpo_loss")
@on_inputs_device
def dpo_loss_triton(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, kind: str, label_smoothing: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    C.need(policy_chosen.dim() == 1, "dpo_loss", f"policy_chosen must be [B], got {tuple(policy_chosen.shape)}")
    C.floating("dpo_loss", "policy_chosen", policy_chosen)
    B = policy_chosen.shape[0]
    for name, t in (("policy_chosen", policy_chosen), ("policy_rejected", policy_rejected),
                    ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        C.shaped("dpo_loss", name, t, (B,), policy_chosen, policy_chosen.dtype)
    C.known("dpo_loss", "preference loss kind", kind, _KINDS)
    out_dtype, acc = acc_types(policy_chosen.dtype)
    outs = [torch.empty((B,), dtype=out_dtype, device=policy_chosen.device) for _ in range(4)]
    if B > 0:
        coef = coef_tensor(policy_chosen.device, out_dtype, beta, label_smoothing)
        block = 256
        _dpo_kernel[(triton.cdiv(B, block),)](policy_chosen, policy_rejected, ref_chosen, ref_rejected, *outs, B,
                                               coef, KIND=_KINDS[kind], ACC=acc, BLOCK=block)
    return tuple(outs)


@triton_twin("sequence_logprobs")
@on_inputs_device
def sequence_logprobs_triton(token_logprobs: torch.Tensor, mask: torch.Tensor | None, average: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = C.rows("sequence_logprobs", "token_logprobs", token_logprobs)
    C.optional_mask("sequence_logprobs", "mask", mask, (B, T), token_logprobs)
    out_dtype, acc = acc_types(token_logprobs.dtype)
    out = torch.zeros((B,), dtype=out_dtype, device=token_logprobs.device)
    counts = torch.zeros((B,), dtype=out_dtype, device=token_logprobs.device)
    if B > 0 and T > 0:
        block = max(16, min(1024, triton.next_power_of_2(T)))
        _sequence_kernel[(B,)](token_logprobs, bool_arg(mask, token_logprobs),
                               out, counts, T, HAS_MASK=mask is not None, AVERAGE=average, ACC=acc, BLOCK_T=block)
    return out, counts


@triton_twin("sequence_logprobs_backward")
@on_inputs_device
def sequence_logprobs_backward_triton(grad: torch.Tensor, mask: torch.Tensor | None, num_tokens: torch.Tensor,
                                      average: bool, T: int, dtype: torch.dtype) -> torch.Tensor:
    op = "sequence_logprobs_backward"
    C.need(grad.dim() == 1 and grad.is_contiguous(), op, "grad must be a contiguous [B] tensor")
    B = grad.shape[0]
    C.need(grad.dtype == C.acc_of(dtype), op, f"grad must be {C.acc_of(dtype)}, got {grad.dtype}")
    C.need(T >= 0, op, f"T must be >= 0, got {T}")
    C.shaped(op, "num_tokens", num_tokens, (B,), grad, grad.dtype)
    C.optional_mask(op, "mask", mask, (B, T), grad)
    # 16-bit gradients are rounded by torch (round to nearest even): the Triton
    # interpreter truncates when it converts to bfloat16.
    out = torch.empty((B, T), dtype=grad.dtype, device=grad.device)
    if B > 0 and T > 0:
        block = max(16, min(1024, triton.next_power_of_2(T)))
        _sequence_backward_kernel[(B, triton.cdiv(T, block))](
            grad, bool_arg(mask, grad), num_tokens, out, T,
            HAS_MASK=mask is not None, AVERAGE=average, BLOCK_T=block)
    return out.to(dtype)
