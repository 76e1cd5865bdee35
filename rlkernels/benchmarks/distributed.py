"""rlkernels.distributed on 4 local ranks over gloo (loopback TCP).

The cases need several processes, so this family exposes `run(device, quick)`
instead of `cases()`: it launches the ranks itself (rlkernels.distributed._launch),
times every implementation inside them (each repeat starts after a barrier and
counts the slowest rank; median after warm-up) and returns rows in the harness's
result format.  GB/s is payload bytes / time (the all-reduce "algorithm bandwidth");
no memory roof or peak-memory column applies across processes.

- average_parameters over 1,024 tensors of 64 KiB vs one dist.all_reduce per tensor
  (and vs flattening with torch.cat, the plain-PyTorch way to bucket);
- ring_all_reduce of 64 MiB vs dist.all_reduce on the same group;
- one gossip round (64 MiB and 1,024 tensors) and the measured consensus rate.

Run alone: python -m rlkernels.benchmarks.distributed [--quick]"""
from __future__ import annotations

import math
import statistics
import sys
import time

import torch
import torch.distributed as dist

from .harness import timed_rows

WORLD = 4


def _timed_once(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the round ends when the slowest rank is done
    return elapsed.item()


def _case(name: str, params: dict, bytes_moved: int, impls: list[tuple[str, bool, object]], warmup: int,
          repeats: int) -> dict:
    """Times the implementations interleaved (one call of each per repeat), so load
    from other processes on the machine falls on all of them alike."""
    times: list[list[float]] = [[] for _ in impls]
    for i in range(warmup + repeats):
        for k, (_, _, fn) in enumerate(impls):
            elapsed = _timed_once(fn)
            if i >= warmup:
                times[k].append(elapsed)
    results = timed_rows([(label, baseline, statistics.median(samples))
                          for (label, baseline, _), samples in zip(impls, times)], bytes_moved)
    return {"family": "distributed", "name": name, "params": {**params, "repeats": repeats},
            "bytes_moved": bytes_moved, "results": results}


def _flatten_all_reduce(tensors: list[torch.Tensor], world: int, bucket_bytes: int) -> None:
    """What plain PyTorch code does: torch.cat a bucket, all_reduce, copy back."""
    start = 0
    while start < len(tensors):
        size, end = 0, start
        while end < len(tensors) and (size == 0 or size + tensors[end].numel() * 4 <= bucket_bytes):
            size += tensors[end].numel() * 4
            end += 1
        group = tensors[start:end]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view(t.shape))
        start = end


def _per_tensor(tensors: list[torch.Tensor], world: int, async_op: bool) -> None:
    if async_op:
        works = [dist.all_reduce(t, async_op=True) for t in tensors]
        for w in works:
            w.wait()
    else:
        for t in tensors:
            dist.all_reduce(t)
    for t in tensors:
        t.div_(world)


def _disagreement(x: torch.Tensor, world: int) -> float:
    mean = x.clone()
    dist.all_reduce(mean)
    mean /= world
    sq = ((x - mean) ** 2).sum().reshape(1)
    dist.all_reduce(sq)
    return math.sqrt(sq.item())


def bench_rank(rank: int, world: int, quick: bool) -> list[dict]:
    from rlkernels.distributed import average_parameters, gossip_average, ring_all_reduce

    warmup, repeats = (1, 3) if quick else (1, 9)
    count = 256 if quick else 1024
    elems = 64 * 1024 // 4
    torch.manual_seed(rank)
    rows = []

    tensors = [torch.randn(elems) for _ in range(count)]
    nbytes = count * elems * 4
    rows.append(_case(
        "average_parameters", {"ranks": world, "tensors": count, "tensor_kib": 64, "dtype": "float32",
                               "bucket_mb": 25},
        nbytes,
        [("dist.all_reduce per tensor", True, lambda: _per_tensor(tensors, world, async_op=False)),
         ("dist.all_reduce per tensor, async", False, lambda: _per_tensor(tensors, world, async_op=True)),
         ("torch.cat buckets + all_reduce", False, lambda: _flatten_all_reduce(tensors, world, 25 * 2 ** 20)),
         ("rlkernels average_parameters", False, lambda: average_parameters(tensors)),
         ("rlkernels average_parameters bf16", False, lambda: average_parameters(tensors, compress="bf16"))],
        warmup, 3 if quick else 5))

    numel = (16 if quick else 64) * 2 ** 20 // 4
    x = torch.randn(numel)

    def all_reduce_mean():
        dist.all_reduce(x)
        x.div_(world)

    rows.append(_case(
        "ring_all_reduce", {"ranks": world, "mib": numel * 4 // 2 ** 20, "dtype": "float32", "op": "mean"},
        numel * 4,
        [("dist.all_reduce", True, all_reduce_mean),
         ("rlkernels ring_all_reduce", False, lambda: ring_all_reduce(x)),
         ("ring_all_reduce segment 16 MiB", False, lambda: ring_all_reduce(x, segment_mb=16)),
         ("ring_all_reduce segment 1 MiB", False, lambda: ring_all_reduce(x, segment_mb=1))],
        warmup, repeats))

    rows.append(_case(
        "gossip_round", {"ranks": world, "mib": numel * 4 // 2 ** 20, "dtype": "float32"}, numel * 4,
        [("dist.all_reduce mean (global average)", True, all_reduce_mean),
         ("rlkernels gossip_average", False, lambda: gossip_average(x))],
        warmup, repeats))
    rows.append(_case(
        "gossip_round_many", {"ranks": world, "tensors": count, "tensor_kib": 64, "dtype": "float32"}, nbytes,
        [("rlkernels average_parameters", True, lambda: average_parameters(tensors)),
         ("rlkernels gossip_average", False, lambda: gossip_average(tensors))],
        warmup, repeats))

    # consensus: disagreement ratio per round, against the spectral prediction
    y = torch.randn(2 ** 20, dtype=torch.float64)
    ratios, times = [], []
    for _ in range(5):
        before = _disagreement(y, world)
        times.append(_timed_once(lambda: gossip_average(y)))
        ratios.append(_disagreement(y, world) / before)
    measured = math.exp(sum(math.log(max(r, 1e-300)) for r in ratios) / len(ratios))
    predicted = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / world)) for k in range(1, world))
    median = statistics.median(times)
    rows.append({"family": "distributed", "name": "gossip_consensus",
                 "params": {"ranks": world, "mib": 8, "dtype": "float64", "weights": "1/3,1/3,1/3",
                            "rounds": len(ratios), "measured_rate": round(measured, 6),
                            "predicted_rate": round(predicted, 6)},
                 "bytes_moved": y.numel() * 8,
                 "results": [{"label": "rlkernels gossip_average", "baseline": False, "median_ms": median * 1e3,
                              "gbps": y.numel() * 8 / median / 1e9, "roof_fraction": None,
                              "peak_extra_mb": None, "speedup_vs": {}, "memory_vs": {}}]})
    return rows


def run(device: str, quick: bool) -> list[dict]:
    """All cases on WORLD local gloo ranks (CPU tensors whatever `device` is: NCCL
    needs one GPU per rank)."""
    from rlkernels.distributed._launch import run_ranks, values_or_raise

    del device
    results = values_or_raise(run_ranks(bench_rank, WORLD, args=(quick,), timeout_s=900, pg_timeout_s=300))
    rows = results[0]
    for row in rows:
        print(f"distributed/{row['name']} {row['params']}: "
              + ", ".join(f"{r['label']} {r['median_ms']:.1f} ms" for r in row["results"]), flush=True)
    return rows


def cases(device: str, quick: bool) -> list:
    """No single-process cases: see run()."""
    return []


if __name__ == "__main__":
    run("cpu", "--quick" in sys.argv)
