"""average_parameters: the global mean (or sum) of many tensors with a few large
all-reduces instead of one per tensor.

Tensors are grouped by dtype and device into buckets of about bucket_mb, each packed
into one flat buffer by the fused pack kernel, reduced with one dist.all_reduce
(gloo and NCCL already run ring or better algorithms) and unpacked in place by the
fused unpack kernel, which also applies the 1/n of the mean.  Packing the next
bucket overlaps the all-reduce of the previous one."""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from ..ops.multi_tensor import pack_tensors, unpack_tensors
from ._common import (Ring, bucket_bytes, check_same_everywhere, collect, compress_dtype, make_buckets,
                      op_name, ring, workspace)
from .ring import SEGMENT_BYTES, ring_reduce_

_FN = "average_parameters"
_IN_FLIGHT = 2  # buckets packed and being reduced at once (bounds the extra memory)


def reduce_buckets(tensors: list[torch.Tensor], where: Ring, *, average: bool, max_bytes: int,
                   wire: torch.dtype | None = None, mode: str = "allreduce", backend: str = "auto") -> None:
    """Replaces every tensor by its sum or mean over the ranks, in place.  mode
    "allreduce" uses dist.all_reduce per bucket, "ring" the neighbour-only ring."""
    n = where.size
    if n == 1 or not tensors:
        return
    if wire is None:
        pre, post = 1.0, (1.0 / n if average else 1.0)
    else:  # compressed: scale before the reduce so the sum of n values cannot overflow
        pre, post = 1.0 / n, (1.0 if average else float(n))
    pending: deque = deque()

    def finish() -> None:
        bucket, flat, work = pending.popleft()
        if work is not None:
            work.wait()
        scale = post
        if flat.dtype == torch.float64 and average and wire is None:
            # float64 has no wider type for the fused scale to round from: divide, so
            # the mean equals all_reduce(sum) / n bit for bit here too.
            flat.div_(n)
            scale = 1.0
        unpack_tensors(flat, bucket.tensors, scale=scale, backend=backend)

    for k, bucket in enumerate(make_buckets(tensors, max_bytes, wire)):
        # slot k % _IN_FLIGHT: the bucket that used it last has been finished
        buffer = workspace(("bucket", k % _IN_FLIGHT), bucket.numel, wire or bucket.dtype, bucket.device)
        flat = pack_tensors(bucket.tensors, out=buffer, scale=pre, backend=backend)
        if mode == "ring":
            ring_reduce_(flat, where, average=False, segment_elems=max(1, SEGMENT_BYTES // flat.element_size()))
            work = None
        else:
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=where.group, async_op=True)
        pending.append((bucket, flat, work))
        if len(pending) >= _IN_FLIGHT:
            finish()
    while pending:
        finish()


def average_parameters(params_or_module, *, group=None, op: str = "mean", bucket_mb: float = 25,
                       compress: str | torch.dtype | None = None, check: bool = True,
                       backend: str = "auto") -> None:
    """Replaces every parameter by its mean (op="mean") or sum (op="sum") over the
    ranks of `group`, in place.

    params_or_module: an nn.Module (its parameters), a tensor, or an iterable of
    floating-point tensors; every rank passes the same shapes and dtypes in the same
    order (checked once per call with one small all_gather unless check=False).
    bucket_mb: size of the flattened messages.  compress="bf16" | "fp16" sends 16-bit
    values, scaled by 1/world_size before the reduce so the sum cannot overflow.
    backend picks the pack/unpack kernels (see rlkernels.pack_tensors)."""
    tensors = collect(_FN, params_or_module)
    average = op_name(_FN, op) == "mean"
    max_bytes = bucket_bytes(_FN, bucket_mb)
    wire = compress_dtype(_FN, compress)
    where = ring(_FN, group)
    if check:
        check_same_everywhere(_FN, tensors, where)
    reduce_buckets(tensors, where, average=average, max_bytes=max_bytes, wire=wire, backend=backend)
