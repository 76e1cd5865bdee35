"""GAE and discounted returns in Triton.

Each step is an affine map of the state carried backwards in time (GAE: the carry
and the next value; returns: the carry), so a row's outputs are a reverse scan of
composed maps.  A program owns a [BLOCK_B, BLOCK_T] tile of rows and steps, loaded
contiguously along time (coalesced), scans it with tl.associative_scan and carries
the state of its earliest step into the next tile back in time: every row is
computed once, by one program.  The tile's shape depends on T alone, so a row's
results do not depend on the batch around it (docs/gpu-kernels.md)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, bool_arg, coef_tensor, on_inputs_device

# Elements of one tile: 4 per thread of 4 warps (128-bit loads of float32).
_TILE = 512


def _tile_shape(T: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_T): the steps of a tile cover the row when T is short, and the
    rest of the tile holds more rows."""
    block_t = max(16, min(_TILE, triton.next_power_of_2(max(T, 1))))
    return _TILE // block_t, block_t


@triton.jit
def _times(k, x):
    """k * x, where a zero coefficient (a reset by dones, or gamma or lam of 0) gives 0
    whatever x is, as the sequential loop's where() does."""
    return tl.where(k == 0.0, 0.0, k * x)


@triton.jit
def _gae_combine(cc1, cn1, nn1, ac1, an1, cc2, cn2, nn2, ac2, an2):
    """Composition of the steps' maps (1: the later steps, applied first; 2: the
    earlier ones) of the state (c, n) = (carry, next value):
        c <- cc * c + cn * n + ac,   n <- nn * n + an."""
    return (_times(cc2, cc1), _times(cc2, cn1) + _times(cn2, nn1), _times(nn2, nn1),
            _times(cc2, ac1) + _times(cn2, an1) + ac2, _times(nn2, an1) + an2)


@triton.jit
def _returns_combine(k1, a1, k2, a2):
    """Composition of c <- k * c + a (1: later, applied first)."""
    return _times(k2, k1), _times(k2, a1) + a2


@triton.jit
def _tile_at(i, T, B, rows, BLOCK_T: tl.constexpr):
    """The i-th tile back from the end of time: element offsets, live lanes, and
    which lane is the tile's earliest step."""
    steps = tl.arange(0, BLOCK_T)
    t = T - (i + 1) * BLOCK_T + steps
    live = (rows < B)[:, None] & (t >= 0)[None, :]
    offs = rows.to(tl.int64)[:, None] * T + t[None, :]
    return offs, live, (steps == 0)[None, :]


@triton.jit
def _step_flags(m_ptr, d_ptr, offs, live, ACC: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr):
    """(valid, z): whether a step counts, and 0 where dones resets the state before it."""
    valid = live
    if HAS_MASK:
        valid = live & (tl.load(m_ptr + offs, mask=live, other=0) != 0)
    z = tl.full(offs.shape, 1.0, ACC)
    if HAS_DONES:
        z = tl.where(tl.load(d_ptr + offs, mask=live, other=0) != 0, 0.0, z)
    return valid, z


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, d_ptr, lv_ptr, adv_ptr, ret_ptr, B, T, coef_ptr,
                HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr, HAS_LAST: tl.constexpr,
                ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    if HAS_LAST:
        next_value = tl.load(lv_ptr + rows, mask=rows < B, other=0.0).to(ACC)
    else:
        next_value = tl.zeros([BLOCK_B], dtype=ACC)
    carry = tl.zeros([BLOCK_B], dtype=ACC)
    gamma = tl.load(coef_ptr)
    gl = gamma * tl.load(coef_ptr + 1)
    for i in range(0, tl.cdiv(T, BLOCK_T)):
        offs, live, first = _tile_at(i, T, B, rows, BLOCK_T)
        r = tl.load(r_ptr + offs, mask=live, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=live, other=0.0).to(ACC)
        valid, z = _step_flags(m_ptr, d_ptr, offs, live, ACC, HAS_MASK, HAS_DONES)
        # a valid step: c <- (r - v) + gamma*z*n + gamma*lam*z*c, n <- v; a masked one
        # keeps (z*c, z*n); a lane outside the tensor is the identity
        keep = tl.where(live, z, 1.0)
        cc = tl.where(valid, gl * z, keep)
        cn = tl.where(valid, gamma * z, 0.0)
        nn = tl.where(valid, 0.0, keep)
        ac = tl.where(valid, r - v, 0.0)
        an = tl.where(valid, v, 0.0)
        cc, cn, nn, ac, an = tl.associative_scan((cc, cn, nn, ac, an), 1, _gae_combine, reverse=True)
        advantages = _times(cc, carry[:, None]) + _times(cn, next_value[:, None]) + ac
        values_next = _times(nn, next_value[:, None]) + an
        tl.store(adv_ptr + offs, advantages, mask=live)
        tl.store(ret_ptr + offs, advantages + v, mask=live)
        carry = tl.sum(tl.where(first, advantages, 0.0), axis=1)
        next_value = tl.sum(tl.where(first, values_next, 0.0), axis=1)


@triton.jit
def _returns_kernel(r_ptr, m_ptr, d_ptr, ret_ptr, B, T, coef_ptr,
                    HAS_MASK: tl.constexpr, HAS_DONES: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    carry = tl.zeros([BLOCK_B], dtype=ACC)
    gamma = tl.load(coef_ptr)
    for i in range(0, tl.cdiv(T, BLOCK_T)):
        offs, live, first = _tile_at(i, T, B, rows, BLOCK_T)
        r = tl.load(r_ptr + offs, mask=live, other=0.0).to(ACC)
        valid, z = _step_flags(m_ptr, d_ptr, offs, live, ACC, HAS_MASK, HAS_DONES)
        # a valid step: c <- r + gamma*z*c; a masked one: c <- z*c; outside: identity
        k = tl.where(valid, gamma * z, tl.where(live, z, 1.0))
        a = tl.where(valid, r, 0.0)
        k, a = tl.associative_scan((k, a), 1, _returns_combine, reverse=True)
        returns = _times(k, carry[:, None]) + a
        tl.store(ret_ptr + offs, returns, mask=live)
        carry = tl.sum(tl.where(first, returns, 0.0), axis=1)


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
        block_b, block_t = _tile_shape(T)
        _gae_kernel[(triton.cdiv(B, block_b),)](
            rewards, values, bool_arg(mask, rewards), bool_arg(dones, rewards),
            last_values if last_values is not None else advantages, advantages, returns, B, T,
            coef_tensor(rewards.device, out_dtype, gamma, lam), HAS_MASK=mask is not None, HAS_DONES=dones is not None,
            HAS_LAST=last_values is not None, ACC=acc, BLOCK_B=block_b, BLOCK_T=block_t)
    return advantages, returns


@triton_twin("discounted_returns")
@on_inputs_device
def discounted_returns_triton(rewards: torch.Tensor, mask: torch.Tensor | None,
                              dones: torch.Tensor | None, gamma: float) -> torch.Tensor:
    B, T = _check_rollout("discounted_returns", rewards, mask, dones)
    out_dtype, acc = acc_types(rewards.dtype)
    returns = torch.empty((B, T), dtype=out_dtype, device=rewards.device)
    if B > 0 and T > 0:
        block_b, block_t = _tile_shape(T)
        _returns_kernel[(triton.cdiv(B, block_b),)](
            rewards, bool_arg(mask, rewards), bool_arg(dones, rewards), returns, B, T,
            coef_tensor(rewards.device, out_dtype, gamma),
            HAS_MASK=mask is not None, HAS_DONES=dones is not None, ACC=acc, BLOCK_B=block_b, BLOCK_T=block_t)
    return returns
