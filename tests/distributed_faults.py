"""Rank-side code for tests/test_distributed_faults.py: one averaging call per group,
with the last rank killed, stalled or given different tensors part-way through.

The fault is injected through rlkernels.distributed._common._FAULT_HOOK, which every
round calls after each completed bucket (or ring step, or the averager's parameter
phase).  Each rank returns a report: the error it got (type, message, seconds) and
whether every tensor the call may write is bitwise as it was before the call (or,
when the call returned, whether it holds the full result)."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import rlkernels.distributed._common as common
from rlkernels.distributed import (AveragingError, AveragingMismatchError, DecentralizedAverager, average_parameters,
                                   gossip_average, ring_all_reduce)

ENTRIES = ("average_parameters", "ring_all_reduce", "gossip_average", "averager_allreduce", "averager_ring",
           "averager_gossip")
WORLD = 3
TINY_BUCKET_MB = 0.002  # < one tensor of _tensors(): one bucket per tensor


def _tensors(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(300 + 7 * i, generator=gen, dtype=torch.float64) for i in range(6)]


def _ring_tensor(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(200 + rank)
    return torch.randn(3001, generator=gen, dtype=torch.float64)


def _gossip_expected(rank: int, world: int, everyone: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    w = (0.5, 0.25, 0.25) if world == 2 else (1 / 3, 1 / 3, 1 / 3)
    return [w[0] * everyone[rank][i] + w[1] * everyone[(rank - 1) % world][i] + w[2] * everyone[(rank + 1) % world][i]
            for i in range(len(everyone[rank]))]


class Subject:
    """One entry point on this rank: call() runs it; watched() lists every tensor
    the call may write; expected() is the full result on success (None: not known
    here); counters() the averager's step counters."""

    def __init__(self, entry: str, rank: int, world: int, timeout):
        self.entry, self.rank, self.world, self.timeout = entry, rank, world, timeout
        self.averager = None
        kw = {} if timeout is None else {"timeout": timeout}
        if entry == "average_parameters":
            self.tensors = _tensors(rank)
            self.call = lambda: average_parameters(self.tensors, bucket_mb=TINY_BUCKET_MB, **kw)
            self._expected = [sum(ts) / world for ts in zip(*[_tensors(r) for r in range(world)])]
        elif entry == "ring_all_reduce":
            self.tensors = [_ring_tensor(rank)]
            self.call = lambda: ring_all_reduce(self.tensors[0], segment_mb=1 / 1024, **kw)  # 8 segments a step
            self._expected = [sum(_ring_tensor(r) for r in range(world)) / world]
        elif entry == "gossip_average":
            self.tensors = _tensors(rank)
            self.call = lambda: gossip_average(self.tensors, bucket_mb=TINY_BUCKET_MB, **kw)
            self._expected = _gossip_expected(rank, world, [_tensors(r) for r in range(world)])
        else:  # an averager with Adam state, one local step taken: parameters and moments differ per rank
            mode = entry.split("_", 1)[1]
            torch.manual_seed(5)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            self.averager = DecentralizedAverager(model, mode=mode, bucket_mb=0.0005, optimizer=optimizer,
                                                  average_optimizer_state=True, **kw)
            gen = torch.Generator().manual_seed(rank)
            model(torch.randn(32, 8, generator=gen, dtype=torch.float64)).pow(2).mean().backward()
            optimizer.step()
            self.tensors = [p.detach() for p in model.parameters()]
            self.tensors += [v for p in model.parameters() for v in optimizer.state[p].values()
                             if isinstance(v, torch.Tensor)]
            if mode != "gossip":
                self.tensors += [g for g in self.averager._global]
            self.call = self.averager.step
            self._expected = None

    def watched(self) -> list[torch.Tensor]:
        return self.tensors

    def expected(self):
        return self._expected

    def counters(self):
        return None if self.averager is None else (self.averager.steps, self.averager.rounds)


def _unchanged(now: list[torch.Tensor], before: list[torch.Tensor]) -> str | None:
    """None when bitwise equal (NaN-aware), else which tensor moved."""
    for i, (a, b) in enumerate(zip(now, before)):
        if not torch.equal(a.view(torch.int64) if a.dtype == torch.float64 else a,
                           b.view(torch.int64) if b.dtype == torch.float64 else b):
            return f"tensor {i} of {len(before)} changed"
    return None


def _marker(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"reached-{rank}")


def _install_fault(rank: int, world: int, fault: str, trigger: tuple[str, int], workdir: str, slow_s: float):
    """The last rank exits (after every other rank has passed the same point, so the
    fault lands between two buckets everywhere) or sleeps slow_s at `trigger`."""
    faulty = rank == world - 1
    fired = []

    def hook(fn, stage, index):
        if (stage, index) != trigger or fired:
            return
        fired.append(True)
        if not faulty:
            open(_marker(workdir, rank), "w").close()
            return
        if fault == "exit":
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(os.path.exists(_marker(workdir, r))
                                                          for r in range(world - 1)):
                time.sleep(0.01)
            os._exit(3)
        time.sleep(slow_s)

    common._FAULT_HOOK = hook
    return fired


def fault_worker(rank: int, world: int, entry: str, fault: str, trigger: tuple[str, int] | None, workdir: str,
                 timeout, slow_s: float) -> dict:
    subject = Subject(entry, rank, world, timeout)
    before = [t.clone() for t in subject.watched()]
    counters = subject.counters()
    point = trigger or ("before the call", 0)
    fired = _install_fault(rank, world, fault, point, workdir, slow_s)
    dist.barrier()
    if trigger is None:
        common.fault_point(entry, *point)
    start = time.monotonic()
    report = {"error": None, "type": None, "attrs": None}
    try:
        subject.call()
    except Exception as exc:  # noqa: BLE001 - what the test inspects
        report.update(error=str(exc), type=[c.__name__ for c in type(exc).__mro__],
                      attrs={k: getattr(exc, k, None) for k in ("fn", "rank", "size", "stage", "peer")})
    report["seconds"] = time.monotonic() - start
    report["hook_fired"] = bool(fired)
    common._FAULT_HOOK = None
    if report["error"] is not None:
        report["changed"] = _unchanged(subject.watched(), before)
        report["counters_kept"] = subject.counters() == counters
    else:
        expected = subject.expected()
        report["complete"] = expected is None or all(
            torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(subject.watched(), expected))
    return report


# ---- mismatched ranks: every rank raises before any data moves, the group stays usable -------------

def _expect_mismatch(name: str, call, watched: list[torch.Tensor], match: str, problems: list[str]) -> float:
    before = [t.clone() for t in watched]
    start = time.monotonic()
    try:
        call()
        problems.append(f"{name}: returned although the ranks differ")
    except AveragingMismatchError as exc:
        if match not in str(exc):
            problems.append(f"{name}: expected {match!r} in: {exc}")
        if not isinstance(exc, ValueError) or not isinstance(exc, AveragingError):
            problems.append(f"{name}: {type(exc).__mro__} is not a ValueError and an AveragingError")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{name}: {type(exc).__name__}: {exc}")
    seconds = time.monotonic() - start
    moved = _unchanged(watched, before)
    if moved:
        problems.append(f"{name}: {moved}")
    return seconds


def mismatch_worker(rank: int, world: int) -> dict:
    last = world - 1
    odd = rank == last
    problems: list[str] = []
    seconds = {}
    tensors = _tensors(rank)
    if odd:
        tensors[3] = torch.randn(5, 5, dtype=torch.float64)
    shape = f"params[3] is float64[321] on rank 0 but float64[5, 5] on rank {last}"
    seconds["average_parameters"] = _expect_mismatch(
        "average_parameters", lambda: average_parameters(tensors, bucket_mb=TINY_BUCKET_MB), tensors, shape, problems)
    seconds["gossip_average"] = _expect_mismatch(
        "gossip_average", lambda: gossip_average(tensors), tensors, shape, problems)
    x = torch.randn(40 + odd, dtype=torch.float64)
    seconds["ring_all_reduce"] = _expect_mismatch(
        "ring_all_reduce", lambda: ring_all_reduce(x), [x], f"float64[40] on rank 0 but float64[41] on rank {last}",
        problems)
    same = _tensors(rank)
    seconds["average_parameters settings"] = _expect_mismatch(
        "average_parameters settings", lambda: average_parameters(same, bucket_mb=1.0 if odd else 25), same,
        f"settings differ across ranks: op='mean', bucket_mb=25.0, compress=None on rank 0 but op='mean', "
        f"bucket_mb=1.0, compress=None on rank {last}", problems)
    y = torch.randn(40, dtype=torch.float64)
    seconds["ring_all_reduce settings"] = _expect_mismatch(
        "ring_all_reduce settings", lambda: ring_all_reduce(y, op="sum" if odd else "mean"), [y],
        "settings differ across ranks", problems)
    # the averager: different shapes or settings at construction, optimizer state at a round
    torch.manual_seed(rank)
    model = torch.nn.Linear(4, 3 + odd)
    params = [p.detach() for p in model.parameters()]
    seconds["DecentralizedAverager"] = _expect_mismatch(
        "DecentralizedAverager", lambda: DecentralizedAverager(model), params,
        f"params[0] is float32[3, 4] on rank 0 but float32[4, 4] on rank {last}", problems)
    model = torch.nn.Linear(4, 3)
    params = [p.detach() for p in model.parameters()]
    seconds["DecentralizedAverager settings"] = _expect_mismatch(
        "DecentralizedAverager settings", lambda: DecentralizedAverager(model, every=2 if odd else 1), params,
        "settings differ across ranks", problems)
    optimizer = torch.optim.Adam(model.parameters())
    averager = DecentralizedAverager(model, optimizer=optimizer, average_optimizer_state=True)
    if odd:  # only this rank has optimizer state yet
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    watched = [p.detach() for p in model.parameters()] + list(averager._global)
    seconds["DecentralizedAverager.average"] = _expect_mismatch(
        "DecentralizedAverager.average", averager.step, watched, "optimizer state differ across ranks", problems)
    if averager.steps != 0 or averager.rounds != 0:
        problems.append(f"averager counters moved: steps={averager.steps} rounds={averager.rounds}")
    # the group is still in step
    ok = torch.ones(1)
    dist.all_reduce(ok)
    if ok.item() != world:
        problems.append("all_reduce after the mismatches is wrong")
    return {"problems": problems, "seconds": seconds}
