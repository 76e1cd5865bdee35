"""Preference losses in Triton: rlkernels::dpo_loss_triton (one program per block of
pairs) and rlkernels::sequence_logprobs_triton (one program per row); the math of
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
