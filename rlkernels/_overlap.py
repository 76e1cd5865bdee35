"""Memory overlap between an op's output and its inputs, decided the way ATen's
get_overlap_status does (aten/src/ATen/MemoryOverlap.cpp): the same elements in the
same layout are a full overlap, any other shared byte a partial one.  A kernel that
reads an input while writing an output partially overlapping it reads values it has
already overwritten; PyTorch's own ops refuse that, and so do ours."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

NONE, FULL, PARTIAL = "none", "full", "partial"


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))  # torch strides are >= 0
    return start, start + (last + 1) * t.element_size()


def _fake(t: torch.Tensor) -> bool:
    # FakeTensorMode's tensors (shape propagation, the host-sync test) have no memory
    return isinstance(t, FakeTensor)


def span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) that `t` may touch ((0, 0): nothing, also
    while torch.compile traces, where there are no addresses)."""
    if t.numel() == 0 or torch.compiler.is_compiling() or _fake(t):
        return 0, 0
    return _byte_range(t)


def outside(t: torch.Tensor, region: tuple[int, int]) -> bool:
    """True when `t` cannot touch any byte of `region` (a span(); same device assumed):
    the cheap test that lets a caller skip the full overlap check."""
    if t.numel() == 0 or region[0] == region[1] or _fake(t):
        return True
    begin, end = _byte_range(t)
    return end <= region[0] or region[1] <= begin


def first_shared(tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """(i, j) with i < j for two of `tensors` whose bytes may overlap, or None: the
    byte ranges sorted by start and swept once, O(n log n) instead of all pairs."""
    if torch.compiler.is_compiling():
        return None
    spans = sorted((*_byte_range(t), i) for i, t in enumerate(tensors) if t.numel() > 0 and not _fake(t))
    reach, owner = None, None
    for begin, end, i in spans:
        if reach is not None and begin < reach and tensors[i].device == tensors[owner].device:
            return (min(i, owner), max(i, owner))
        if reach is None or end > reach:
            reach, owner = end, i
    return None


def status(a: torch.Tensor, b: torch.Tensor) -> str:
    """NONE, FULL (same elements, same layout, same dtype) or PARTIAL (any other shared
    memory; conservative for interleaved strided views, which the ops never pass)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return NONE
    if torch.compiler.is_compiling() or _fake(a) or _fake(b):  # no addresses while tracing
        return NONE
    a_begin, a_end = _byte_range(a)
    b_begin, b_end = _byte_range(b)
    if a_end <= b_begin or b_end <= a_begin:
        return NONE
    if (a_begin == b_begin and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype):
        return FULL
    return PARTIAL


def check_output(op: str, out_name: str, out: torch.Tensor, name: str, value: torch.Tensor, *,
                 allow_full: bool) -> None:
    """Raises ValueError where `out` shares memory with input `value` other than as the
    very same elements (a full overlap, allowed where the op computes elementwise in place)."""
    found = status(out, value)
    if found == PARTIAL or (found == FULL and not allow_full):
        how = "partially overlaps" if found == PARTIAL else "is"
        raise ValueError(f"{op}: {out_name} {how} {name} in memory; the kernel would read values it has already "
                         f"overwritten. Pass a separate {out_name}" + (" or exactly the same tensor" if allow_full
                                                                        else "") + ".")
