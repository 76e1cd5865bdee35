"""Group advantages in Triton: one program per group, reading only its own members, so
the kernel's work is O(N) however many groups there are.  Contiguous groups (group_size):
a program reads its run of group_size scores.  Ids (group_index): the host code sorts the
positions by id on the device (stable, so members keep their order) and finds each id's
first place in that order by searchsorted, as the CUDA backend does; a program reads its
run of that order, O(N log N) in all for the sort.  Nothing is read on the host.  The
batch std (scale="batch") is computed once by masked.mean_and_variance, not by every
program."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import triton_twin
from . import _checks as C
from ._common import acc_types, coef_tensor, on_inputs_device
from .masked import mean_and_variance

_MIN_BLOCK, _MAX_BLOCK = 16, 1024


def _block(members: int) -> int:
    """A block that fits a group of `members` scores, so a program reads it once."""
    return max(_MIN_BLOCK, min(_MAX_BLOCK, triton.next_power_of_2(max(members, 1))))


def _group_runs(group_index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, starts): the positions stably sorted by id, and the place in that order
    where each id in [0, num_groups] begins (starts[g]..starts[g + 1] are group g's
    members; ids below 0 sort before starts[0], ids from num_groups on after
    starts[num_groups]).  Device work only: nothing waits on the ids."""
    sorted_ids, order = torch.sort(group_index, stable=True)
    starts = torch.searchsorted(sorted_ids, torch.arange(num_groups + 1, dtype=sorted_ids.dtype,
                                                         device=sorted_ids.device))
    return order, starts


@triton.jit
def _positions(order_ptr, k, live, HAS_INDEX: tl.constexpr):
    """The score positions of the members at places k of the group's run."""
    if HAS_INDEX:
        return tl.load(order_ptr + k, mask=live, other=0)
    return k


@triton.jit
def _group_advantages_kernel(s_ptr, order_ptr, starts_ptr, adv_ptr, eq_ptr, batch_ptr, N, group_size, coef_ptr,
                             HAS_INDEX: tl.constexpr, LOO: tl.constexpr, SCALE: tl.constexpr,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program per group: its members are places [begin, end) of the run, a
    contiguous one (group_size) or the id-sorted order (group_index)."""
    g = tl.program_id(0)
    if HAS_INDEX:
        begin = tl.load(starts_ptr + g)
        end = tl.load(starts_ptr + g + 1)
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
        k = start + tl.arange(0, BLOCK)
        live = k < end
        x = tl.load(s_ptr + _positions(order_ptr, k, live, HAS_INDEX), mask=live, other=0.0).to(ACC)
        total += tl.where(live, x, 0.0)
        count += tl.where(live, 1.0, 0.0)
        nans += tl.where(live & (x != x), 1.0, 0.0)
        lo = tl.where(live & (x < lo), x, lo)
        hi = tl.where(live & (x > hi), x, hi)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(begin, end, BLOCK):
        k = start + tl.arange(0, BLOCK)
        live = k < end
        x = tl.load(s_ptr + _positions(order_ptr, k, live, HAS_INDEX), mask=live, other=0.0).to(ACC)
        sq += tl.where(live, (x - mean) * (x - mean), 0.0)
    std = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n - 1.0, 1.0))
    if SCALE == 1:  # the whole batch's std, computed once (masked.mean_and_variance)
        std = tl.sqrt(tl.load(batch_ptr + 1))
    for start in range(begin, end, BLOCK):
        k = start + tl.arange(0, BLOCK)
        live = k < end
        position = _positions(order_ptr, k, live, HAS_INDEX)
        x = tl.load(s_ptr + position, mask=live, other=0.0).to(ACC)
        centred = x - mean
        if LOO:
            centred = centred * n / tl.maximum(n - 1.0, 1.0)
        if SCALE != 2:
            centred = centred / (std + eps)
        tl.store(adv_ptr + position, tl.where(n > 1.0, centred, 0.0), mask=live)
    if HAS_INDEX:
        if g == 0:  # an id outside [0, num_groups) belongs to no program: the first one flags it
            below = tl.load(starts_ptr)  # ids < 0 sort first, ids >= num_groups last
            above = tl.load(starts_ptr + tl.num_programs(0))
            for low_start in range(0, below, BLOCK):  # (new names: `start` is typed by the loops above)
                k = low_start + tl.arange(0, BLOCK)
                stray = k < below
                tl.store(adv_ptr + tl.load(order_ptr + k, mask=stray, other=0),
                         tl.full([BLOCK], float("nan"), dtype=ACC), mask=stray)
            for high_start in range(above, N, BLOCK):
                k = high_start + tl.arange(0, BLOCK)
                stray = k < N
                tl.store(adv_ptr + tl.load(order_ptr + k, mask=stray, other=0),
                         tl.full([BLOCK], float("nan"), dtype=ACC), mask=stray)
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
        return advantages, all_equal
    batch = mean_and_variance(scores, None, acc) if scale == 1 else advantages
    if group_index is not None:
        order, starts = _group_runs(group_index, num_groups)
        # the mean group's size: ids of groups of group_size in runs get the contiguous
        # path's block, so its summation order and bits
        block = _block(-(-N // num_groups))
    else:
        order = starts = scores  # never read
        block = _block(group_size)
    _group_advantages_kernel[(num_groups,)](
        scores, order, starts, advantages, all_equal.view(torch.int8), batch, N, max(group_size, 1),
        coef_tensor(scores.device, out_dtype, eps),
        HAS_INDEX=group_index is not None, LOO=baseline == 1, SCALE=scale, ACC=acc, BLOCK=block,
        num_warps=_warps(block))
    return advantages, all_equal


def _warps(block: int) -> int:
    # at most 4 members a thread: 8 (a 1024 block on 4 warps) spill the id path's registers
    # on sm_80 and sm_90 (.ci/triton_aot.py); one rule for both paths, so ids in runs keep
    # the group_size path's reduction order and bits
    return max(4, min(8, block // 128))
