"""Runs a function on several local ranks over gloo, for the tests and benchmarks.

Each rank is a fresh process (forkserver: children fork from a server that has
already imported torch and rlkernels) that joins a process group through a FileStore
with an explicit timeout, runs `fn(rank, world_size, *args)` and leaves its result or
traceback in a file.  The parent enforces a wall-clock deadline and kills whatever
is still running then, so a hung rank fails the caller instead of hanging it."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from ._common import exit_without_teardown


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    seconds: float = 0.0


_CONTEXT = None
_TEARDOWN_S = 1.0  # how long a rank that has left its result may take to exit before it is killed


def _context(start_method: str):
    global _CONTEXT
    if start_method != "forkserver":
        return multiprocessing.get_context(start_method)
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # torch._dynamo is what the first optimizer step imports (~3 s per process otherwise).
        _CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "rlkernels"])
    return _CONTEXT


def _child(fn, rank: int, world_size: int, store_path: str, result_path: str, backend: str,
           pg_timeout_s: float, threads: int, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        outcome = {"ok": True, "value": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        outcome = {"ok": False, "error": traceback.format_exc()}
    outcome["seconds"] = time.perf_counter() - start
    tmp = f"{result_path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(outcome, f)
    os.replace(tmp, result_path)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        exit_without_teardown(0)


def run_ranks(fn: Callable, world_size: int, *, args: tuple = (), timeout_s: float = 120.0,
              pg_timeout_s: float = 30.0, backend: str = "gloo", threads: int = 1,
              start_method: str = "forkserver") -> list[RankResult]:
    """Runs fn(rank, world_size, *args) on `world_size` processes; returns one
    RankResult per rank.  fn must be importable (a module-level function).  Ranks
    still alive after timeout_s are killed and reported as failed; ranks that have
    left their result are killed if they do not exit within a second.  pg_timeout_s
    is the process group's timeout (init_process_group(timeout=...))."""
    ctx = _context(start_method)
    workdir = tempfile.mkdtemp(prefix="rlk-dist-")
    store_path = os.path.join(workdir, "store")
    paths = [os.path.join(workdir, f"rank{r}.pkl") for r in range(world_size)]
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(fn, r, world_size, store_path, paths[r], backend, pg_timeout_s, threads, args))
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        # Done once every rank has left its result (or exited): a rank whose peers died
        # may then sit in destroy_process_group until gloo's own timeout, which no
        # caller needs to wait for.
        while time.monotonic() < deadline and not all(os.path.exists(path) or not p.is_alive()
                                                      for p, path in zip(procs, paths)):
            time.sleep(0.02)
        teardown = min(deadline, time.monotonic() + _TEARDOWN_S)
        for p in procs:
            p.join(max(0.0, teardown - time.monotonic()))
        late = [r for r, p in enumerate(procs) if p.is_alive() and not os.path.exists(paths[r])]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results = []
        for r, path in enumerate(paths):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcome = pickle.load(f)
                results.append(RankResult(r, outcome["ok"], outcome.get("value"), outcome.get("error", ""),
                                          outcome["seconds"]))
            elif r in late:
                results.append(RankResult(r, False, error=f"rank {r} did not finish within {timeout_s:.0f} s "
                                                          "and was killed"))
            else:
                results.append(RankResult(r, False, error=f"rank {r} exited with code {procs[r].exitcode} "
                                                          "without a result"))
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def values_or_raise(results: list[RankResult]) -> list:
    """The ranks' return values, or AssertionError with every failed rank's report."""
    failed = [r for r in results if not r.ok]
    if failed:
        raise AssertionError("\n".join(f"--- rank {r.rank} ---\n{r.error}" for r in failed))
    return [r.value for r in results]
