"""gossip_average: one round of neighbour mixing on the ring,

    theta_i <- w_self * theta_i + w_left * theta_{i-1} + w_right * theta_{i+1}.

The mixing matrix is circulant with rows and columns summing to 1, so the mean over
the ranks is kept (up to rounding) and every other component shrinks by the
magnitude of its eigenvalue w_self + w_left e^{-2 pi i k/n} + w_right e^{2 pi i k/n}.
With weights 1/3 the disagreement falls by 1/3 per round at 4 ranks and vanishes in
one round at 3; two ranks mix 1/2 : 1/2 by default.  Each bucket is packed once,
sent to both neighbours with dist.batch_isend_irecv (sends and receives posted
together, so no rank blocks in a send) and mixed by the fused gossip_mix kernel into
a staging buffer (a bucket holding one contiguous tensor is sent as it is, without
packing).  All or nothing: the mixed buckets are copied into the parameters only
after every exchange of the round has completed."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

from ..ops.multi_tensor import gossip_mix, gossip_weights, pack_tensors, unpack_tensors
from ._common import (Ring, Round, bucket_buffers, bucket_bytes, check_same_everywhere, collect, fault_point,
                      make_buckets, ring, timeout_arg, workspace)

_FN = "gossip_average"
_TAG = 0x4753
_IN_FLIGHT = 2


def default_weights(size: int) -> tuple[float, float, float]:
    """1/3 each; with two ranks left and right are the same peer: 1/2 self, 1/2 peer."""
    return (0.5, 0.25, 0.25) if size == 2 else (1 / 3, 1 / 3, 1 / 3)


def gossip_buckets(tensors: list[torch.Tensor], where: Ring, rnd: Round, weights: tuple[float, float, float], *,
                   max_bytes: int, backend: str = "auto", tag: str = "gossip") -> Callable[[], None]:
    """Mixes every bucket with the neighbours' into staging buffers and returns the
    commit that unpacks them into the tensors (nothing is written before)."""
    if where.size == 1 or not tensors:
        return lambda: None
    buckets = make_buckets(tensors, max_bytes)
    mixed = bucket_buffers(tag, buckets)  # the round's results, until the commit
    pending: deque = deque()
    staged: list[int] = []

    def wait(k: int, works: list) -> None:
        for work, peer, what in works:
            rnd.wait(work, f"bucket {k + 1} of {len(buckets)}, {what}", peer)
        fault_point(rnd.fn, "bucket", k)

    def finish() -> None:
        k, mine, from_left, from_right, works = pending.popleft()
        wait(k, works)
        gossip_mix(mine, from_left, from_right, weights, out=mixed[k], backend=backend)
        staged.append(k)

    for k, bucket in enumerate(buckets):
        slot = k % _IN_FLIGHT  # the bucket that used this slot last has been finished

        def buffer(name: str) -> torch.Tensor:
            return workspace((tag, name, slot), bucket.numel, bucket.dtype, bucket.device)

        only = bucket.tensors[0]
        if len(bucket.tensors) == 1 and only.is_contiguous():
            mine = only.view(-1)  # sent as it is and mixed into the staging buffer: no pack
        else:
            mine = pack_tensors(bucket.tensors, out=mixed[k], backend=backend)  # mixed in place later
        from_left = buffer("from_left")
        left, right = "receiving from the left neighbour", "receiving from the right neighbour"
        if where.size == 2:  # one peer, who is both neighbours: w_left + w_right apply to it
            from_right = from_left
            ops = [dist.P2POp(dist.irecv, from_left, where.left, where.group, _TAG),
                   dist.P2POp(dist.isend, mine, where.right, where.group, _TAG)]
            about = [(where.left, "receiving from the peer"), (where.right, "sending to the peer")]
        else:
            from_right = buffer("from_right")
            ops = [dist.P2POp(dist.irecv, from_left, where.left, where.group, _TAG),
                   dist.P2POp(dist.irecv, from_right, where.right, where.group, _TAG),
                   dist.P2POp(dist.isend, mine, where.left, where.group, _TAG),
                   dist.P2POp(dist.isend, mine, where.right, where.group, _TAG)]
            about = [(where.left, left), (where.right, right), (where.left, "sending to the left neighbour"),
                     (where.right, "sending to the right neighbour")]
        works = [(work, peer, what) for work, (peer, what) in zip(dist.batch_isend_irecv(ops), about)]
        pending.append((k, mine, from_left, from_right, works))
        if len(pending) >= _IN_FLIGHT:
            finish()
    # The last buckets in flight: once they have arrived the round is complete, so
    # they are mixed straight into place at the commit (a one-bucket round then
    # costs no copy more than an in-place one).
    last = list(pending)
    for k, _, _, _, works in last:
        wait(k, works)

    def commit() -> None:
        for k in staged:
            unpack_tensors(mixed[k], buckets[k].tensors, backend=backend)
        for k, mine, from_left, from_right, _ in last:
            gossip_mix(mine, from_left, from_right, weights, out=mine, backend=backend)
            if mine.data_ptr() != buckets[k].tensors[0].data_ptr() or len(buckets[k].tensors) > 1:
                unpack_tensors(mine, buckets[k].tensors, backend=backend)

    return commit


def gossip_average(params_or_tensor, *, group=None, weights: tuple[float, float, float] | None = None,
                   bucket_mb: float = 25, check: bool = True, timeout=None, backend: str = "auto") -> None:
    """One gossip round on the ring of `group`, in place, all or nothing:
    theta_i <- w_self * theta_i + w_left * theta_left + w_right * theta_right.

    weights = (w_self, w_left, w_right), non-negative and summing to 1; default
    (1/3, 1/3, 1/3), and (1/2, 1/4, 1/4) with two ranks (left and right are then
    the same peer, so it weighs 1/2).  params_or_tensor: an nn.Module, a tensor or an
    iterable of floating-point tensors, the same shapes and dtypes (and bucket_mb) on
    every rank (checked with one small all_gather unless check=False).  timeout
    (seconds or timedelta): how long to wait for each exchange; default the process
    group's timeout.  If an exchange fails, raises rlkernels.distributed.AveragingError
    with every tensor unchanged."""
    tensors = collect(_FN, params_or_tensor)
    max_bytes = bucket_bytes(_FN, bucket_mb)
    limit = timeout_arg(_FN, timeout)
    where = ring(_FN, group)
    weights = gossip_weights(f"rlkernels.distributed.{_FN}", default_weights(where.size) if weights is None else weights)
    device = tensors[0].device if tensors else None
    with Round(_FN, where, limit, "parameters", device) as rnd:
        if check:
            check_same_everywhere(_FN, tensors, where, settings={"bucket_mb": float(bucket_mb)}, rnd=rnd)
        commit = gossip_buckets(tensors, where, rnd, weights, max_bytes=max_bytes, backend=backend)
    with torch.no_grad():
        commit()
