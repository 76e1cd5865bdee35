"""Errors, the shard layout (where this rank's columns start) and the collectives of
the vocabulary-parallel ops."""
from __future__ import annotations

import time
import zlib

import torch
import torch.distributed as dist

from ... import _validate as V
from .._common import _cause, comm_device, ring, timeout_arg

_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


class VocabParallelError(RuntimeError):
    """A vocabulary-parallel call failed on this rank: a peer exited or did not answer
    within the timeout.  No tensor was written.  Attributes: fn, rank, size, stage."""

    def __init__(self, message: str, *, fn: str, rank: int, size: int, stage: str):
        super().__init__(message)
        self.fn, self.rank, self.size, self.stage = fn, rank, size, stage


class VocabParallelMismatchError(VocabParallelError, ValueError):
    """The ranks' arguments disagree (token count, dtype, settings, labels, shard sizes
    that do not add up to the vocabulary): raised on every rank before any statistics
    move."""


class _Layout:
    """This rank in the call: who it is, the timeout, and where its shard starts
    (vocab, the full vocabulary, is None when the header exchange was skipped)."""

    def __init__(self, fn, group, rank, size, timeout, vocab_start=None, vocab=None):
        self.fn, self.group, self.rank, self.size, self.timeout = fn, group, rank, size, timeout
        self.vocab_start, self.vocab = vocab_start, vocab
        self.starts: list[int] | None = None  # every rank's first column (after the header exchange)
        self.sizes: list[int] | None = None


def _wait(where: _Layout, work, stage: str) -> None:
    start = time.monotonic()
    try:
        if where.timeout is None:
            work.wait()
        else:
            work.wait(timeout=where.timeout)
    except RuntimeError as exc:
        raise VocabParallelError(
            f"rlkernels.distributed.vocab_parallel.{where.fn}: rank {where.rank} of {where.size}: {stage} failed "
            f"after {time.monotonic() - start:.1f} s: {_cause(exc)}  No output was written; the process group is "
            "likely unusable now: destroy it and create a new one.", fn=where.fn, rank=where.rank,
            size=where.size, stage=stage) from exc


def _all_gather(where: _Layout, tensor: torch.Tensor, stage: str) -> torch.Tensor:
    """[ranks, ...] of every rank's `tensor`, on tensor's device."""
    sent = tensor.to(comm_device(where.group, tensor.device))
    out = [torch.empty_like(sent) for _ in range(where.size)]
    _wait(where, dist.all_gather(out, sent, group=where.group, async_op=True), stage)
    return torch.stack(out).to(tensor.device)


_PRIME = 65521  # keeps every term of the label checksum below 2**32


def _label_digest(labels: torch.Tensor, ignore_index: int) -> tuple[int, int, int]:
    """(smallest, largest, checksum) of the labels other than ignore_index (a host read:
    only under check=True)."""
    flat = labels.reshape(-1).to(torch.int64)
    kept = flat[flat != ignore_index]
    lo = int(kept.min()) if kept.numel() else 0
    hi = int(kept.max()) if kept.numel() else -1
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device) % _PRIME
    checksum = int(((flat % _PRIME) * weights).sum()) if flat.numel() else 0
    return lo, hi, checksum


def layout(fn: str, group, *, tokens: int, local_vocab: int, dtype: torch.dtype, device: torch.device,
           labels: torch.Tensor | None, ignore_index: int, settings: tuple, check: bool, vocab_start,
           timeout, every_shard: bool = False) -> _Layout:
    """Where this rank's shard starts and the full vocabulary size; with check=True the
    header exchange that raises VocabParallelMismatchError on every rank.  every_shard:
    the caller needs every rank's shard (the exact mode), so the header is exchanged
    even with check=False and vocab_start given."""
    me = ring(f"vocab_parallel.{fn}", group)
    where = _Layout(fn, group, me.rank, me.size, timeout_arg(f"vocab_parallel.{fn}", timeout))
    if vocab_start is not None:
        vocab_start = V.integer(fn, "vocab_start", vocab_start, low=0)
    if not check and vocab_start is not None and not every_shard:
        where.vocab_start = vocab_start
        return where
    lo, hi, checksum = _label_digest(labels, ignore_index) if check and labels is not None else (0, -1, 0)
    header = [tokens, _DTYPE_CODES.get(dtype, 0), local_vocab, -1 if vocab_start is None else vocab_start,
              lo, hi, checksum, zlib.crc32(repr(settings).encode())]
    local = torch.tensor(header, dtype=torch.int64, device=device)
    table = _all_gather(where, local, "the header exchange (shard sizes and settings)").cpu()
    sizes = table[:, 2].tolist()
    starts = [sum(sizes[:r]) for r in range(where.size)]
    vocab = sum(sizes)
    if check:
        problem = _mismatch(table, starts, vocab, ignore_index)
        if problem:
            raise VocabParallelMismatchError(
                f"rlkernels.distributed.vocab_parallel.{fn}: {problem} (raised on every rank before any "
                "statistics moved; nothing was written)", fn=fn, rank=where.rank, size=where.size, stage="check")
    where.vocab_start, where.vocab = starts[where.rank], vocab
    where.starts, where.sizes = starts, sizes
    return where


def _mismatch(table: torch.Tensor, starts: list[int], vocab: int, ignore_index: int) -> str:
    names = {0: "the token count (leading shape)", 1: "the dtype", 7: "the settings (temperature, "
             "ignore_index, flags)", 6: "the labels (every rank must pass the same global label ids)"}
    for col in (0, 1, 7, 6):
        column = table[:, col].tolist()
        for r, value in enumerate(column):
            if value != column[0]:
                what = names[col]
                if col == 0:
                    return f"{what} is {column[0]} on rank 0 but {value} on rank {r}"
                return f"{what} differ between rank 0 and rank {r}"
    given = table[:, 3].tolist()
    for r, value in enumerate(given):
        if value >= 0 and value != starts[r]:
            return (f"rank {r} passed vocab_start={value} but the shards before it hold {starts[r]} columns "
                    f"(shard sizes in rank order: {table[:, 2].tolist()}); shards must be contiguous, in rank order")
    lo, hi = int(table[0, 4]), int(table[0, 5])
    if hi >= 0 and (lo < 0 or hi >= vocab):
        bad = lo if lo < 0 else hi
        return (f"labels must lie in [0, {vocab}) (the shard sizes {table[:, 2].tolist()} add up to {vocab}) "
                f"or equal ignore_index={ignore_index}; got {bad}")
    return ""



def gather_stats(where: _Layout, stats: torch.Tensor) -> torch.Tensor:
    """[ranks, n, width] statistics of every rank's shard, on stats' device."""
    return _all_gather(where, stats, "the statistics exchange")


def all_reduce_sum(where: _Layout, tensor: torch.Tensor, stage: str) -> torch.Tensor:
    sent = tensor.to(comm_device(where.group, tensor.device))
    _wait(where, dist.all_reduce(sent, group=where.group, async_op=True), stage)
    return sent.to(tensor.device)
