"""GAE and discounted returns in Triton: a block of rows per program, the rows in
the lanes, a reverse loop over time."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, bool_arg, coef_tensor, on_inputs_device


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, d_ptr, lv_ptr, adv_ptr, ret_ptr, B, T, coef_ptr,
                HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr, HAS_LAST: tl.constexpr,
                ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    base = rows.to(tl.int64) * T
    if HAS_LAST:
        next_value = tl.load(lv_ptr + rows, mask=live, other=0.0).to(ACC)
    else:
        next_value = tl.zeros([BLOCK_B], dtype=ACC)
    carry = tl.zeros([BLOCK_B], dtype=ACC)
    gamma = tl.load(coef_ptr)
    gl = gamma * tl.load(coef_ptr + 1)
    for i in range(0, T):
        t = T - 1 - i
        r = tl.load(r_ptr + base + t, mask=live, other=0.0).to(ACC)
        v = tl.load(v_ptr + base + t, mask=live, other=0.0).to(ACC)
        if HAS_DONES:
            done = tl.load(d_ptr + base + t, mask=live, other=0) != 0
            next_value = tl.where(done, 0.0, next_value).to(ACC)
            carry = tl.where(done, 0.0, carry).to(ACC)
        a = r + gamma * next_value - v + gl * carry
        if HAS_MASK:
            valid = tl.load(m_ptr + base + t, mask=live, other=0) != 0
            next_value = tl.where(valid, v, next_value)
            carry = tl.where(valid, a, carry)
        else:
            next_value = v
            carry = a
        tl.store(adv_ptr + base + t, carry, mask=live)
        tl.store(ret_ptr + base + t, carry + v, mask=live)


@triton.jit
def _returns_kernel(r_ptr, m_ptr, d_ptr, ret_ptr, B, T, coef_ptr,
                    HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    base = rows.to(tl.int64) * T
    carry = tl.zeros([BLOCK_B], dtype=ACC)
    gamma = tl.load(coef_ptr)
    for i in range(0, T):
        t = T - 1 - i
        r = tl.load(r_ptr + base + t, mask=live, other=0.0).to(ACC)
        if HAS_DONES:
            done = tl.load(d_ptr + base + t, mask=live, other=0) != 0
            carry = tl.where(done, 0.0, carry).to(ACC)
        g = r + gamma * carry
        if HAS_MASK:
            valid = tl.load(m_ptr + base + t, mask=live, other=0) != 0
            carry = tl.where(valid, g, carry)
        else:
            carry = g
        tl.store(ret_ptr + base + t, carry, mask=live)


_BLOCK_B = 32


def _check_rollout(op, rewards, mask, dones):
    B, T = C.rows(op, "rewards", rewards)
    C.optional_mask(op, "mask", mask, (B, T), rewards)
    C.optional_mask(op, "dones", dones, (B, T), rewards)
    return B, T


@triton_twin("gae")
@on_inputs_device
def gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               dones: torch.Tensor | None, last_values: torch.Tensor | None, gamma: float,
               lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = _check_rollout("gae", rewards, mask, dones)
    C.shaped("gae", "values", values, (B, T), rewards, rewards.dtype)
    if last_values is not None:
        C.shaped("gae", "last_values", last_values, (B,), rewards, C.acc_of(rewards.dtype))
    out_dtype, acc = acc_types(rewards.dtype)
    advantages = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    returns = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    if B > 0 and T > 0:
        grid = (triton.cdiv(B, _BLOCK_B),)
        _gae_kernel[grid](
            rewards, values, bool_arg(mask, rewards), bool_arg(dones, rewards),
            last_values if last_values is not None else advantages, advantages, returns, B, T,
            coef_tensor(rewards.device, out_dtype, gamma, lam), HAS_MASK=mask is not None, HAS_DONES=dones is not None,
            HAS_LAST=last_values is not None, ACC=acc, BLOCK_B=_BLOCK_B)
    return advantages, returns


@triton_twin("discounted_returns")
@on_inputs_device
def discounted_returns_triton(rewards: torch.Tensor, mask: torch.Tensor | None,
                              dones: torch.Tensor | None, gamma: float) -> torch.Tensor:
    B, T = _check_rollout("discounted_returns", rewards, mask, dones)
    out_dtype, acc = acc_types(rewards.dtype)
    returns = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    if B > 0 and T > 0:
        grid = (triton.cdiv(B, _BLOCK_B),)
        _returns_kernel[grid](
            rewards, bool_arg(mask, rewards), bool_arg(dones, rewards), returns, B, T,
            coef_tensor(rewards.device, out_dtype, gamma),
            HAS_MASK=mask is not None, HAS_DONES=dones is not None, ACC=acc, BLOCK_B=_BLOCK_B)
    return returns
