"""Shared plumbing for rlkernels.distributed: the process group, the tensors to
average, the cross-rank signature check, bucketing, and the all-or-nothing rounds
(AveragingError, Round)."""
from __future__ import annotations

import datetime
import hashlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import _validate as V

OPS = ("mean", "sum")
COMPRESS = {None: None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def _prefix(fn: str) -> str:
    return f"rlkernels.distributed.{fn}"


class AveragingError(RuntimeError):
    """An averaging call failed on this rank: a peer exited, did not answer within
    the timeout, or passed different tensors.  Every tensor the call would have
    written (parameters, optimizer state, the averager's theta_global) is exactly
    as it was before the call.  Attributes: fn, rank (group rank), size, stage,
    peer (global rank of the peer involved, or None), elapsed_s."""

    def __init__(self, message: str, *, fn: str, rank: int, size: int, stage: str = "",
                 peer: int | None = None, elapsed_s: float = 0.0):
        super().__init__(message)
        self.fn, self.rank, self.size, self.stage, self.peer, self.elapsed_s = fn, rank, size, stage, peer, elapsed_s


class AveragingMismatchError(AveragingError, ValueError):
    """The ranks passed tensors (or settings) that differ: raised on every rank by
    the check that runs before any data moves."""


@dataclass(frozen=True)
class Ring:
    """This rank's place in the group: group ranks and the neighbours' global ranks."""
    group: object
    rank: int
    size: int
    left: int   # global rank of group rank (rank - 1) % size
    right: int  # global rank of group rank (rank + 1) % size


def ring(fn: str, group) -> Ring:
    """Checks that torch.distributed is ready and that this process belongs to
    `group`; raises RuntimeError/ValueError naming `fn` otherwise."""
    if not dist.is_available():
        raise RuntimeError(f"{_prefix(fn)}: this build of torch has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{_prefix(fn)}: the default process group is not initialised; call "
            "torch.distributed.init_process_group(backend, timeout=...) first (torchrun sets "
            "MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE for it)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{_prefix(fn)}: this process (global rank {dist.get_rank()}) is not a member of group")
    size = dist.get_world_size(group)

    def global_rank(group_rank: int) -> int:
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    return Ring(group, rank, size, global_rank((rank - 1) % size), global_rank((rank + 1) % size))


def op_name(fn: str, op) -> str:
    return V.choice(_prefix(fn), "op", op, OPS)


def bucket_bytes(fn: str, bucket_mb) -> int:
    mb = V.number(_prefix(fn), "bucket_mb", bucket_mb, low=0.0, low_open=True)
    return max(1, int(mb * 2 ** 20))


def compress_dtype(fn: str, compress) -> torch.dtype | None:
    try:
        return COMPRESS[compress]
    except (KeyError, TypeError):
        raise ValueError(f"{_prefix(fn)}: compress must be None, 'bf16' or 'fp16', got {compress!r}") from None


def collect(fn: str, obj, name: str = "params") -> list[torch.Tensor]:
    """The floating-point tensors to average, detached (they share storage with the
    originals, so in-place writes land in the parameters without autograd noticing)."""
    if isinstance(obj, torch.nn.Module):
        tensors = list(obj.parameters())
    elif isinstance(obj, torch.Tensor):
        tensors = [obj]
    elif isinstance(obj, (list, tuple)) or hasattr(obj, "__iter__"):
        tensors = list(obj)
    else:
        raise TypeError(f"{_prefix(fn)}: {name} must be an nn.Module, a tensor or an iterable of tensors, "
                        f"got {type(obj).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_prefix(fn)}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"{_prefix(fn)}: {name}[{i}] must be floating point "
                            f"(float32, float64, float16 or bfloat16), got {t.dtype}")
        if _self_overlapping(t):
            raise ValueError(f"{_prefix(fn)}: {name}[{i}] (shape {list(t.shape)}, stride {list(t.stride())}) has "
                             "elements that share memory (an expand()ed or as_strided view), so it cannot hold "
                             "the averaged values; pass a tensor that owns each element (e.g. .clone())")
    return [t.detach() for t in tensors]


def _self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of `t` may share a memory location.  A sufficient test for
    no overlap: with the dimensions sorted by stride, each stride reaches past every
    element the smaller dimensions address (true of every dense layout, contiguous or
    permuted, and of slices of them)."""
    reach = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < reach:
            return True
        reach += (size - 1) * stride
    return False


def _describe(tensors: list[torch.Tensor]) -> list[str]:
    return [f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in tensors]


def comm_device(group, device: torch.device) -> torch.device:
    """Where a message for `group` must live: NCCL only moves CUDA tensors."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_same_everywhere(fn: str, tensors: list[torch.Tensor], where: Ring, what: str = "params",
                          settings: dict | None = None, rnd: Round | None = None) -> None:
    """Raises AveragingMismatchError (a ValueError) on every rank when the ranks'
    tensors differ in count, shape or dtype, or their `settings` (the arguments that
    decide the message layout, e.g. bucket_mb) differ.  Cost: one all_gather of 3
    int64 per rank; the full descriptions are exchanged only when something differs,
    to name the first difference.  Runs before any data moves."""
    if where.size == 1:
        return
    described = _describe(tensors)
    shown = ", ".join(f"{k}={v!r}" for k, v in (settings or {}).items())
    digest = hashlib.blake2b("|".join(described + [shown]).encode(), digest_size=8).digest()
    device = comm_device(where.group, tensors[0].device if tensors else torch.device("cpu"))
    local = torch.tensor([len(tensors), sum(t.numel() for t in tensors),
                          int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(where.size)]
    work = dist.all_gather(gathered, local, group=where.group, async_op=True)
    if rnd is None:
        work.wait()
    else:
        rnd.wait(work, "the check that every rank passes the same tensors")
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    everyone: list = [None] * where.size
    dist.all_gather_object(everyone, (described, shown), group=where.group)
    other = next(r for r in range(where.size) if everyone[r] != everyone[0])
    (first, first_shown), (theirs, their_shown) = everyone[0], everyone[other]
    if first == theirs:
        detail = f"settings differ across ranks: {first_shown} on rank 0 but {their_shown} on rank {other}"
    else:
        detail = f"rank 0 has {len(first)} tensors, rank {other} has {len(theirs)}"
        for i, (a, b) in enumerate(zip(first, theirs)):
            if a != b:
                detail = f"{what}[{i}] is {a} on rank 0 but {b} on rank {other}"
                break
        detail = f"{what} differ across ranks (shape or dtype): {detail}"
    raise AveragingMismatchError(
        f"{_prefix(fn)}: {detail} (group ranks; every rank must pass the same tensors in the same order and "
        "the same settings).  Raised on every rank before any data moved; nothing was changed.",
        fn=fn, rank=where.rank, size=where.size, stage="check",
        peer=other if where.group is None else dist.get_global_rank(where.group, other))


@dataclass(eq=False)
class Bucket:
    """Tensors of one dtype and device that travel as one flat message."""
    dtype: torch.dtype
    device: torch.device
    tensors: list[torch.Tensor] = field(default_factory=list)
    numel: int = 0


def make_buckets(tensors: list[torch.Tensor], max_bytes: int, wire_dtype: torch.dtype | None = None) -> list[Bucket]:
    """Groups tensors by (dtype, device) in order of first appearance and fills
    buckets of at most `max_bytes` on the wire (a larger tensor gets its own)."""
    open_buckets: dict[tuple, Bucket] = {}
    done: list[Bucket] = []
    for t in tensors:
        key = (t.dtype, t.device)
        size = (wire_dtype or t.dtype).itemsize
        bucket = open_buckets.get(key)
        if bucket is not None and bucket.numel > 0 and (bucket.numel + t.numel()) * size > max_bytes:
            done.append(bucket)
            bucket = None
        if bucket is None:
            bucket = open_buckets[key] = Bucket(t.dtype, t.device)
        bucket.tensors.append(t)
        bucket.numel += t.numel()
    done.extend(b for b in open_buckets.values() if b.tensors)
    return done


_WORKSPACE = threading.local()


def workspace(tag, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D buffer of `numel` elements kept between calls (per thread) for CPU
    tensors: a fresh one costs a page fault per 4 KiB on first write, which takes
    longer than the copy into it.  CUDA's caching allocator already recycles
    memory, so there a plain allocation is returned.  Contents are undefined."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    key = (tag, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_buffers() -> None:
    """Frees the CPU buffers that rlkernels.distributed keeps between calls: the
    staged results of the largest round (one copy of the tensors averaged, per
    function), two receive buffers per bucket in flight, and (1 + 2/n) times the
    largest tensor given to ring_all_reduce."""
    _WORKSPACE.buffers = {}


def bucket_buffers(tag, buckets: list[Bucket], wire_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """One flat buffer per bucket (of the bucket's dtype, or `wire_dtype`), carved
    from one workspace per dtype: the whole round's results stay staged here until
    they are committed."""
    totals: dict = {}
    for b in buckets:
        key = (wire_dtype or b.dtype, b.device)
        totals[key] = totals.get(key, 0) + b.numel
    bases = {key: workspace((tag, str(key[1])), total, key[0], key[1]) for key, total in totals.items()}
    offsets = dict.fromkeys(totals, 0)
    out = []
    for b in buckets:
        key = (wire_dtype or b.dtype, b.device)
        out.append(bases[key][offsets[key]:offsets[key] + b.numel])
        offsets[key] += b.numel
    return out


# ---- all-or-nothing rounds ---------------------------------------------------------------------

def timeout_arg(fn: str, timeout) -> datetime.timedelta | None:
    """None (the process group's timeout), seconds > 0, or a positive timedelta."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
        if not seconds > 0:
            raise ValueError(f"{_prefix(fn)}: timeout must be > 0, got {timeout!r}")
        return timeout
    seconds = V.number(_prefix(fn), "timeout", timeout, low=0.0, low_open=True)
    return datetime.timedelta(seconds=seconds)


def _group_timeout(group, device: torch.device) -> datetime.timedelta | None:
    """The process group's own timeout for `device`, or None where torch hides it."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        return pg._get_backend(device).options._timeout
    except Exception:  # noqa: BLE001 - private API: fall back to plain waits
        return None


# Test hook: called as _FAULT_HOOK(fn, stage, index) after each completed step of a
# round (stage "bucket": bucket `index` has been exchanged; "ring step": ring step
# `index`; "parameters": the averager's parameter phase).  tests/test_distributed_faults.py
# uses it to kill or stall a rank between two buckets.
_FAULT_HOOK = None


def fault_point(fn: str, stage: str, index: int) -> None:
    if _FAULT_HOOK is not None:
        _FAULT_HOOK(fn, stage, index)


_GLOO_SOURCE = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def _cause(exc: BaseException) -> str:
    """The first line of a torch.distributed error without gloo's source location
    and boilerplate hint."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _GLOO_SOURCE.sub("", text)
    text = text.split(" This is typically caused by")[0].strip()[:300]
    return text if text.endswith((".", "!", "?")) else text + "."


class Round:
    """The communication of one averaging call on this rank.  Used as a context
    manager around everything that talks to the peers; results are written to
    scratch buffers inside it and committed to the caller's tensors after it exits
    cleanly.  A torch.distributed failure inside becomes an AveragingError naming the
    function, this rank, the stage, the peer (where one is involved) and the cause.
    After a failure the CPU workspace is dropped: an abandoned gloo operation may
    still write into it."""

    def __init__(self, fn: str, where: Ring, timeout: datetime.timedelta | None, what: str,
                 device: torch.device | None = None):
        self.fn, self.where, self.what = fn, where, what
        self.timeout = timeout
        if timeout is None and device is not None and device.type == "cuda":
            # NCCL's wait() only orders streams; a timeout makes it block until the
            # operation has completed (or failed), which the commit must know.
            timeout = _group_timeout(where.group, device)
        self._kwargs = {} if timeout is None else {"timeout": timeout}
        self.stage = "starting"
        self.peer: int | None = None
        self.start = time.monotonic()

    def wait(self, work, stage: str, peer: int | None = None) -> None:
        """work.wait() under the round's timeout (if any), recording what is awaited."""
        self.stage, self.peer = stage, peer
        work.wait(**self._kwargs)

    def __enter__(self) -> Round:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            return False
        release_buffers()
        if isinstance(exc, AveragingError) or not isinstance(exc, RuntimeError):
            return False
        elapsed = time.monotonic() - self.start
        where = self.where
        me = f"rank {where.rank} of {where.size}"
        if where.group is not None:
            me += f" (global rank {dist.get_rank()})"
        about = []
        if self.peer is not None:
            about.append(f"peer: {'global ' if where.group is not None else ''}rank {self.peer}")
        if self.timeout is not None:
            about.append(f"timeout={self.timeout.total_seconds():g} s")
        else:
            about.append("timeout: the process group's")
        raise AveragingError(
            f"{_prefix(self.fn)}: {me}: {self.stage} failed after {elapsed:.1f} s ({', '.join(about)}): "
            f"{_cause(exc)}  "
            f"The {self.what} on this rank {'is' if self.what == 'tensor' else 'are'} unchanged (a round is all or nothing on each rank; peers may have "
            "finished or failed it on their own).  The process group is likely unusable now: destroy it and "
            "create a new one before averaging again.",
            fn=self.fn, rank=where.rank, size=where.size, stage=self.stage, peer=self.peer,
            elapsed_s=elapsed) from exc


def exit_without_teardown(code: int = 0) -> None:
    """Flushes stdout and stderr and ends the process with `code`, skipping interpreter
    teardown.  For the last line of a torch.distributed process, after
    destroy_process_group(): with gloo, torch 2.13 aborts in that teardown about one run
    in eight ("terminate called without an active exception") after a clean run, and a
    process whose peers died may wait there on gloo's threads (docs/distributed.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
