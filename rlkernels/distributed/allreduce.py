"""average_parameters: the global mean (or sum) of many tensors with a few large
all-reduces instead of one per tensor.

Tensors are grouped by dtype and device into buckets of about bucket_mb, each packed
into one flat buffer by the fused pack kernel and reduced with one dist.all_reduce
(gloo and NCCL already run ring or better algorithms); packing the next bucket
overlaps the all-reduce of the previous one.  The round is all or nothing: the
reduced buckets stay in the workspace until every all-reduce has completed, and only
then does the fused unpack kernel (which also applies the 1/n of the mean) write them
into the parameters."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

from ..ops.multi_tensor import pack_tensors, unpack_tensors
from ._common import (Ring, Round, bucket_buffers, bucket_bytes, check_same_everywhere, collect, compress_dtype,
                      fault_point, make_buckets, op_name, ring, timeout_arg)
from .ring import SEGMENT_BYTES, ring_reduce_

_FN = "average_parameters"
_IN_FLIGHT = 2  # all-reduces posted ahead of the oldest unfinished one


def reduce_buckets(tensors: list[torch.Tensor], where: Ring, rnd: Round, *, average: bool, max_bytes: int,
                   wire: torch.dtype | None = None, mode: str = "allreduce", backend: str = "auto",
                   tag: str = "reduce") -> Callable[[], None]:
    """Reduces every tensor's sum or mean over the ranks into staging buffers and
    returns the commit that writes them into the tensors (nothing is written before).
    mode "allreduce" uses dist.all_reduce per bucket, "ring" the neighbour-only ring."""
    n = where.size
    if n == 1 or not tensors:
        return lambda: None
    if wire is None:
        pre, post = 1.0, (1.0 / n if average else 1.0)
    else:  # compressed: scale before the reduce so the sum of n values cannot overflow
        pre, post = 1.0 / n, (1.0 if average else float(n))
    buckets = make_buckets(tensors, max_bytes, wire)
    flats = bucket_buffers(tag, buckets, wire)
    # float64 has no wider type for the fused scale to round from: divide, so the mean
    # equals all_reduce(sum) / n bit for bit here too.
    divide = [flat.dtype == torch.float64 and average and wire is None for flat in flats]
    pending: deque = deque()

    def finish() -> None:
        k, work = pending.popleft()
        if work is not None:
            rnd.wait(work, f"all_reduce of bucket {k + 1} of {len(buckets)}")
        if divide[k]:
            flats[k].div_(n)
        fault_point(rnd.fn, "bucket", k)

    for k, (bucket, flat) in enumerate(zip(buckets, flats)):
        pack_tensors(bucket.tensors, out=flat, scale=pre, backend=backend)
        if mode == "ring":
            ring_reduce_(flat, where, rnd, average=False, segment_elems=max(1, SEGMENT_BYTES // flat.element_size()),
                         label=f"bucket {k + 1} of {len(buckets)}")
            work = None
        else:
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=where.group, async_op=True)
        pending.append((k, work))
        if len(pending) >= _IN_FLIGHT:
            finish()
    while pending:
        finish()

    def commit() -> None:
        for bucket, flat, divided in zip(buckets, flats, divide):
            unpack_tensors(flat, bucket.tensors, scale=1.0 if divided else post, backend=backend)

    return commit


def average_parameters(params_or_module, *, group=None, op: str = "mean", bucket_mb: float = 25,
                       compress: str | torch.dtype | None = None, check: bool = True, timeout=None,
                       backend: str = "auto") -> None:
    """Replaces every parameter by its mean (op="mean") or sum (op="sum") over the
    ranks of `group`, in place, all or nothing.

    params_or_module: an nn.Module (its parameters), a tensor, or an iterable of
    floating-point tensors; every rank passes the same shapes and dtypes in the same
    order, and the same op, bucket_mb and compress (checked once per call with one
    small all_gather unless check=False; without that check a mismatch can abort the
    process under gloo, see docs/distributed.md).  Local problems (an expanded or
    self-overlapping tensor, bad arguments) raise before any communication.  bucket_mb: size of the flattened messages.
    compress="bf16" | "fp16" sends 16-bit values, scaled by 1/world_size before the
    reduce so the sum cannot overflow.  timeout (seconds or timedelta): how long to
    wait for each collective; default the process group's timeout.  If any
    collective fails or times out, raises rlkernels.distributed.AveragingError and
    leaves every parameter unchanged.  backend picks the pack/unpack kernels (see
    rlkernels.pack_tensors)."""
    tensors = collect(_FN, params_or_module)
    average = op_name(_FN, op) == "mean"
    max_bytes = bucket_bytes(_FN, bucket_mb)
    wire = compress_dtype(_FN, compress)
    limit = timeout_arg(_FN, timeout)
    where = ring(_FN, group)
    device = tensors[0].device if tensors else None
    with Round(_FN, where, limit, "parameters", device) as rnd:
        if check:
            settings = {"op": op, "bucket_mb": float(bucket_mb), "compress": None if wire is None else str(wire).replace("torch.", "")}
            check_same_everywhere(_FN, tensors, where, settings=settings, rnd=rnd)
        commit = reduce_buckets(tensors, where, rnd, average=average, max_bytes=max_bytes, wire=wire,
                                backend=backend)
    with torch.no_grad():
        commit()
