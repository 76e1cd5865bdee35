"""Group advantages in Triton: one program per group scanning the scores in blocks
(members selected by index)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, coef_tensor, on_inputs_device

_BLOCK = 128


@triton.jit
def _members(idx_ptr, offs, live, g, group_size, HAS_INDEX: tl.constexpr):
    if HAS_INDEX:
        return live & (tl.load(idx_ptr + offs, mask=live, other=-1) == g)
    return live & (offs // group_size == g)


@triton.jit
def _group_advantages_kernel(s_ptr, idx_ptr, adv_ptr, eq_ptr, N, group_size, coef_ptr,
                             HAS_INDEX: tl.constexpr, LOO: tl.constexpr, SCALE: tl.constexpr,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    eps = tl.load(coef_ptr)
    total = tl.zeros([BLOCK], dtype=ACC)
    count = tl.zeros([BLOCK], dtype=ACC)
    lo = tl.full([BLOCK], float("inf"), dtype=ACC)
    hi = tl.full([BLOCK], float("-inf"), dtype=ACC)
    nans = tl.zeros([BLOCK], dtype=ACC)
    batch_total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < N
        x = tl.load(s_ptr + offs, mask=live, other=0.0).to(ACC)
        member = _members(idx_ptr, offs, live, g, group_size, HAS_INDEX)
        total += tl.where(member, x, 0.0)
        count += tl.where(member, 1.0, 0.0)
        nans += tl.where(member & (x != x), 1.0, 0.0)
        lo = tl.where(member & (x < lo), x, lo)
        hi = tl.where(member & (x > hi), x, hi)
        batch_total += tl.where(live, x, 0.0)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    batch_mean = tl.sum(batch_total, axis=0) / tl.maximum(N, 1).to(ACC)
    sq = tl.zeros([BLOCK], dtype=ACC)
    batch_sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < N
        x = tl.load(s_ptr + offs, mask=live, other=0.0).to(ACC)
        member = _members(idx_ptr, offs, live, g, group_size, HAS_INDEX)
        sq += tl.where(member, (x - mean) * (x - mean), 0.0)
        batch_sq += tl.where(live, (x - batch_mean) * (x - batch_mean), 0.0)
    std = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n - 1.0, 1.0))
    batch_std = tl.sqrt(tl.sum(batch_sq, axis=0) / tl.maximum(N - 1, 1).to(ACC))
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < N
        x = tl.load(s_ptr + offs, mask=live, other=0.0).to(ACC)
        member = _members(idx_ptr, offs, live, g, group_size, HAS_INDEX)
        centred = x - mean
        if LOO:
            centred = centred * n / tl.maximum(n - 1.0, 1.0)
        if SCALE == 0:
            centred = centred / (std + eps)
        if SCALE == 1:
            centred = centred / (batch_std + eps)
        adv = tl.where(n > 1.0, centred, 0.0)
        tl.store(adv_ptr + offs, adv, mask=member)
    if HAS_INDEX:
        if g == 0:  # an id outside [0, num_groups) belongs to no program: the first one flags it
            for start in range(0, N, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                live = offs < N
                ids = tl.load(idx_ptr + offs, mask=live, other=0)
                stray = live & ((ids < 0) | (ids >= tl.num_programs(0)))
                tl.store(adv_ptr + offs, tl.full([BLOCK], float("nan"), dtype=ACC), mask=stray)
    # counted, not left to min/max (a GPU's drop NaN): a group holding NaN is never all-equal
    # and finite: a group of +-inf scores has NaN advantages, which a skip must not hide
    low = tl.min(lo, axis=0)
    equal = (n == 0.0) | ((low == tl.max(hi, axis=0)) & (tl.sum(nans, axis=0) == 0.0) & (low > -float("inf"))
                          & (low < float("inf")))
    tl.store(eq_ptr + g, equal.to(tl.int8))


@triton_twin("group_advantages")
@on_inputs_device
def group_advantages_triton(scores: torch.Tensor, group_index: torch.Tensor | None, group_size: int,
                            num_groups: int, baseline: int, scale: int, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    op = "group_advantages"
    C.need(scores.dim() == 1 and scores.is_contiguous(), op, "scores must be a contiguous 1-D tensor")
    C.floating(op, "scores", scores)
    N = scores.shape[0]
    C.need(0 <= num_groups <= N, op, f"num_groups must lie in [0, {N}] (the number of scores), got {num_groups}")
    if group_index is not None:
        C.shaped(op, "group_index", group_index, (N,), scores, torch.int64)
    else:
        C.need(group_size > 0 and N % group_size == 0 and N // group_size == num_groups, op,
               "group_size must divide N into num_groups groups")
    C.need(baseline in (0, 1), op, f"bad baseline code {baseline}")
    C.need(scale in (0, 1, 2), op, f"bad scale code {scale}")
    out_dtype, acc = acc_types(scores.dtype)
    advantages = torch.empty(N, dtype=out_dtype, device=scores.device)
    all_equal = torch.empty(num_groups, dtype=torch.bool, device=scores.device)
    if num_groups == 0:
        # No program runs, so none flags the ids (all outside the empty range): NaN, as a
        # stray id gets, rather than uninitialised memory.
        advantages.fill_(float("nan"))
    else:
        _group_advantages_kernel[(num_groups,)](
            scores, group_index if group_index is not None else scores, advantages, all_equal.view(torch.int8),
            N, max(group_size, 1), coef_tensor(scores.device, out_dtype, eps),
            HAS_INDEX=group_index is not None, LOO=baseline == 1, SCALE=scale, ACC=acc, BLOCK=_BLOCK)
    return advantages, all_equal
