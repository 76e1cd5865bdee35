"""Group advantages in Triton: one program per group.  Contiguous groups (group_size):
a program reads only its own scores, O(N) in all; ids (group_index): each program
scans every score for its members, O(groups x N).  The batch std (scale="batch") is
computed once by masked.mean_and_variance, not by every program."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, coef_tensor, on_inputs_device
from .masked import mean_and_variance

_BLOCK = 128


@triton.jit
def _members(idx_ptr, offs, live, g, HAS_INDEX: tl.constexpr):
    if HAS_INDEX:
        return live & (tl.load(idx_ptr + offs, mask=live, other=-1) == g)
    return live


@triton.jit
def _group_advantages_kernel(s_ptr, idx_ptr, adv_ptr, eq_ptr, batch_ptr, N, group_size, coef_ptr,
                             HAS_INDEX: tl.constexpr, LOO: tl.constexpr, SCALE: tl.constexpr,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program per group.  Contiguous groups: the program reads its own
    group_size scores; ids: every score, keeping its group's."""
    g = tl.program_id(0)
    if HAS_INDEX:
        begin = tl.zeros([], dtype=tl.int64)
        end = begin + N
    else:
        begin = g.to(tl.int64) * group_size
        end = begin + group_size
    eps = tl.load(coef_ptr)
    total = tl.zeros([BLOCK], dtype=ACC)
    count = tl.zeros([BLOCK], dtype=ACC)
    lo = tl.full([BLOCK], float("inf"), dtype=ACC)
    hi = tl.full([BLOCK], float("-inf"), dtype=ACC)
    nans = tl.zeros([BLOCK], dtype=ACC)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < end
        x = tl.load(s_ptr + offs, mask=live, other=0.0).to(ACC)
        member = _members(idx_ptr, offs, live, g, HAS_INDEX)
        total += tl.where(member, x, 0.0)
        count += tl.where(member, 1.0, 0.0)
        nans += tl.where(member & (x != x), 1.0, 0.0)
        lo = tl.where(member & (x < lo), x, lo)
        hi = tl.where(member & (x > hi), x, hi)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < end
        x = tl.load(s_ptr + offs, mask=live, other=0.0).to(ACC)
        member = _members(idx_ptr, offs, live, g, HAS_INDEX)
        sq += tl.where(member, (x - mean) * (x - mean), 0.0)
    std = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n - 1.0, 1.0))
    if SCALE == 1:  # the whole batch's std, computed once (masked.mean_and_variance)
        std = tl.sqrt(tl.load(batch_ptr + 1))
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        live = offs < end
        x = tl.load(s_ptr + offs, mask=live, other=0.0).to(ACC)
        member = _members(idx_ptr, offs, live, g, HAS_INDEX)
        centred = x - mean
        if LOO:
            centred = centred * n / tl.maximum(n - 1.0, 1.0)
        if SCALE != 2:
            centred = centred / (std + eps)
        tl.store(adv_ptr + offs, tl.where(n > 1.0, centred, 0.0), mask=member)
    if HAS_INDEX:
        if g == 0:  # an id outside [0, num_groups) belongs to no program: the first one flags it
            for chunk in range(0, N, BLOCK):  # (not `start`: an int64 in the loops above)
                offs = chunk + tl.arange(0, BLOCK)
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
        batch = mean_and_variance(scores, None, acc) if scale == 1 else advantages
        # contiguous groups: a block that fits the group, so a program reads it once
        block = _BLOCK if group_index is not None else max(16, min(1024, triton.next_power_of_2(group_size)))
        _group_advantages_kernel[(num_groups,)](
            scores, group_index if group_index is not None else scores, advantages, all_equal.view(torch.int8),
            batch, N, max(group_size, 1), coef_tensor(scores.device, out_dtype, eps),
            HAS_INDEX=group_index is not None, LOO=baseline == 1, SCALE=scale, ACC=acc, BLOCK=block)
    return advantages, all_equal
