"""All-reduce over a ring of neighbour-only point-to-point links.

For topologies where an agent reaches only its two neighbours.  Reduce-scatter
then all-gather, each n-1 steps: the flat tensor is cut into n chunks (sizes differ
by at most one element, so any size works) and every chunk into m segments.  In step
s a rank sends one chunk to its right neighbour and receives one from its left; a
received segment is added (reduce-scatter) or stored in place (all-gather) and is
the segment the rank sends in step s+1, so segment j of step s+1 goes out as soon as
segment j of step s has arrived: transfer and addition overlap, and no step waits
for a whole chunk.  Every send is posted together with its receive through
dist.batch_isend_irecv, so neither gloo (whose send waits for the peer's receive)
nor NCCL can deadlock with every rank sending first.

Sums are formed in the tensor's dtype in ring order; on integer-valued data the
result equals dist.all_reduce bit for bit, and the mean is that sum divided by n."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _validate as V
from ._common import (Ring, Round, check_same_everywhere, collect, fault_point, op_name, ring, timeout_arg,
                      workspace)

_FN = "ring_all_reduce"
_TAG = 0x524C  # gloo matches point-to-point messages by (peer, tag)
# Pipelining granularity: smaller segments overlap more, but each message costs a
# rendezvous (how 4 MiB was chosen: docs/distributed.md).
SEGMENT_BYTES = 4 << 20


def _exchange(send: torch.Tensor, recv: torch.Tensor, where: Ring, tag: int) -> list:
    """Posts one send to the right neighbour and one receive from the left, together;
    returns [(work, peer, what)]."""
    ops, about = [], []
    if recv.numel():  # the receive first: gloo's sender waits for it
        ops.append(dist.P2POp(dist.irecv, recv, where.left, where.group, tag))
        about.append((where.left, "receiving from the left neighbour"))
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send, where.right, where.group, tag))
        about.append((where.right, "sending to the right neighbour"))
    return list(zip(dist.batch_isend_irecv(ops), *zip(*about))) if ops else []


def ring_reduce_(flat: torch.Tensor, where: Ring, rnd: Round, *, average: bool, segment_elems: int,
                 out: torch.Tensor | None = None, tag: int = _TAG, label: str = "") -> torch.Tensor:
    """Sums (or averages) the contiguous 1-D `flat` across the ring into `out` (a
    contiguous 1-D tensor like flat; default flat itself, in place) and returns it.
    With a separate `out`, flat is only read: every receive lands in `out` or the
    ring's scratch; only the first step's send reads flat."""
    n, r = where.size, where.rank
    if out is None:
        out = flat
    if n == 1:
        if out is not flat:
            out.copy_(flat)
        return out
    total = flat.numel()
    base, extra = divmod(total, n)
    starts = [c * base + min(c, extra) for c in range(n + 1)]
    longest = base + (1 if extra else 0)
    m = max(1, -(-longest // max(1, segment_elems)))
    scratch = workspace("ring", 2 * longest, flat.dtype, flat.device).view(2, longest)

    def bounds(c: int, j: int) -> tuple[int, int]:
        length = starts[c + 1] - starts[c]
        return starts[c] + j * length // m, starts[c] + (j + 1) * length // m

    def scratch_segment(s: int, c: int, j: int) -> torch.Tensor:
        a, b = bounds(c, j)
        return scratch[s % 2, a - starts[c]:b - starts[c]]

    steps = 2 * (n - 1)
    where_label = f" ({label})" if label else ""

    def send_chunk(s: int) -> int:
        return (r - s) % n if s < n - 1 else (r + 1 - (s - n + 1)) % n

    def recv_chunk(s: int) -> int:
        return (r - s - 1) % n if s < n - 1 else (r - (s - n + 1)) % n

    def post(s: int, j: int) -> list:
        incoming = recv_chunk(s)
        a, b = bounds(incoming, j)
        target = scratch_segment(s, incoming, j) if s < n - 1 else out[a:b]
        a, b = bounds(send_chunk(s), j)
        # step 0 sends this rank's own chunk as it is; later steps send what arrived
        return _exchange((flat if s == 0 else out)[a:b], target, where, tag)

    pending = [post(0, j) for j in range(m)]
    for s in range(steps):
        incoming = recv_chunk(s)
        following = []
        for j in range(m):
            for work, peer, what in pending[j]:
                rnd.wait(work, f"ring step {s + 1} of {steps}{where_label}, {what}", peer)
            if s < n - 1:
                a, b = bounds(incoming, j)
                # out = flat + received: in place when out is flat
                torch.add(flat[a:b], scratch_segment(s, incoming, j), out=out[a:b])
                if average and s == n - 2:
                    out[a:b].div_(n)  # this rank's chunk is complete: divide before it circulates
            if s + 1 < steps:
                # The segment just completed is the one step s+1 sends; scratch[(s+1) % 2]
                # was last read by step s-1's addition of this segment, already done.
                following.append(post(s + 1, j))
        pending = following
        fault_point(rnd.fn, "ring step", s)
    return out


def ring_all_reduce(tensor: torch.Tensor, *, group=None, op: str = "mean", segment_mb: float = 4.0,
                    check: bool = True, timeout=None) -> torch.Tensor:
    """Sums (op="sum") or averages (op="mean") `tensor` across the ranks of `group`
    in place, over neighbour-only point-to-point links; returns `tensor`.

    Every rank must pass a tensor of the same shape and dtype, and the same op and
    segment_mb (checked with one small all_gather unless check=False).  segment_mb
    sets the pipelining granularity.  timeout (seconds or timedelta): how long to
    wait for each exchange with a neighbour; default the process group's timeout.
    All or nothing: the ring runs in a workspace buffer and the result is copied into
    `tensor` only after every exchange has completed; if one fails, raises
    rlkernels.distributed.AveragingError with `tensor` unchanged."""
    prefix = f"rlkernels.distributed.{_FN}"
    V.float_tensor(prefix, "tensor", tensor)
    average = op_name(_FN, op) == "mean"
    segment_mb = V.number(prefix, "segment_mb", segment_mb, low=0.0, low_open=True)
    limit = timeout_arg(_FN, timeout)
    where = ring(_FN, group)
    with Round(_FN, where, limit, "tensor", tensor.device) as rnd:
        if check:
            settings = {"op": op, "segment_mb": segment_mb}
            check_same_everywhere(_FN, collect(_FN, tensor, "tensor"), where, what="tensor", settings=settings,
                                  rnd=rnd)
        if where.size == 1 or tensor.numel() == 0:
            return tensor
        data = tensor.detach()
        flat = data.view(-1) if data.is_contiguous() else data.contiguous().view(-1)
        staged = workspace("ring-result", flat.numel(), flat.dtype, flat.device)
        segment_elems = max(1, int(segment_mb * 2 ** 20) // data.element_size())
        with torch.no_grad():
            ring_reduce_(flat, where, rnd, average=average, segment_elems=segment_elems, out=staged)
    with torch.no_grad():
        data.copy_(staged.view(data.shape))
    return tensor
