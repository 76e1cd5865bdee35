"""Shared plumbing for rlkernels.distributed: the process group, the tensors to
average, the cross-rank signature check and bucketing."""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .. import _validate as V

OPS = ("mean", "sum")
COMPRESS = {None: None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def _prefix(fn: str) -> str:
    return f"rlkernels.distributed.{fn}"


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
    return [t.detach() for t in tensors]


def _describe(tensors: list[torch.Tensor]) -> list[str]:
    return [f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in tensors]


def check_same_everywhere(fn: str, tensors: list[torch.Tensor], where: Ring, what: str = "params") -> None:
    """Raises ValueError on every rank when the ranks' tensors differ in count, shape
    or dtype.  Cost: one all_gather of 3 int64 per rank; the full descriptions are
    exchanged only when something differs, to name the first difference."""
    if where.size == 1:
        return
    described = _describe(tensors)
    digest = hashlib.blake2b("|".join(described).encode(), digest_size=8).digest()
    device = tensors[0].device if tensors else torch.device("cpu")
    if dist.get_backend(where.group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    local = torch.tensor([len(tensors), sum(t.numel() for t in tensors),
                          int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(where.size)]
    dist.all_gather(gathered, local, group=where.group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    everyone: list = [None] * where.size
    dist.all_gather_object(everyone, described, group=where.group)
    other = next(r for r in range(where.size) if everyone[r] != everyone[0])
    first, theirs = everyone[0], everyone[other]
    detail = f"rank 0 has {len(first)} tensors, rank {other} has {len(theirs)}"
    for i, (a, b) in enumerate(zip(first, theirs)):
        if a != b:
            detail = f"{what}[{i}] is {a} on rank 0 but {b} on rank {other}"
            break
    raise ValueError(f"{_prefix(fn)}: {what} differ across ranks (shape or dtype): {detail} "
                     "(group ranks; every rank must pass the same tensors in the same order)")


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
    """Frees the CPU buffers that rlkernels.distributed keeps between calls (about
    two buckets, plus 2/n of the largest tensor given to ring_all_reduce)."""
    _WORKSPACE.buffers = {}
