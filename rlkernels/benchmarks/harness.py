"""Benchmark harness: every implementation of a case is timed in the same
process, interleaved (one call of each per round; median after warm-up, more
rounds for fast cases), with ratios against the baselines of the same
run, effective bandwidth against the memory roof measured in this run, and
peak extra memory.

Allocator settings are fixed and printed (they move PyTorch's own baselines by
up to 3x here): torch's transparent huge pages (THP_MEM_ALLOC_ENABLE, set before
start-up by `rlkernels.benchmarks.__main__`) and glibc's mmap/trim thresholds, set with
mallopt.  Timing runs with blocks up to 32 MiB recycled from the heap (glibc's
steady state in a training loop); blocks above that are fresh mmaps for every
implementation alike.

Peak memory: on CUDA, torch's allocator peak; on CPU, the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident
size before the call, measured with every block >= 64 KiB served by a fresh
mmap and returned at once, so it counts every page touched, temporaries inside
C++ kernels included."""
from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

ALLOCATOR_ENV = {
    # torch's CPU allocator: transparent huge pages for large blocks.
    "THP_MEM_ALLOC_ENABLE": "1",
}
# glibc mallopt settings (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) per phase.
MALLOPT = {
    "timing": {"mmap_threshold": 32 * 2**20, "trim_threshold": 256 * 2**20},
    "memory": {"mmap_threshold": 64 * 2**10, "trim_threshold": 0},
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_phase = {"name": "glibc defaults"}


def set_allocator_phase(phase: str) -> None:
    """Applies MALLOPT[phase] through glibc's mallopt (a no-op where there is none)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        settings = MALLOPT[phase]
        libc.mallopt(_M_MMAP_THRESHOLD, settings["mmap_threshold"])
        libc.mallopt(_M_TRIM_THRESHOLD, settings["trim_threshold"])
        libc.malloc_trim(0)
        _allocator_phase["name"] = phase
    except (OSError, AttributeError):
        _allocator_phase["name"] = "glibc defaults (mallopt unavailable)"


@dataclasses.dataclass
class Impl:
    label: str
    fn: Callable[[], object]
    baseline: bool = False
    setup: Callable[[], object] | None = None


@dataclasses.dataclass
class Case:
    family: str
    name: str
    params: dict
    bytes_moved: int
    impls: list[Impl]
    # (warm-up, repeats) for cases whose every call takes seconds; None: the default
    repeats: tuple[int, int] | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _can_track_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_kb("VmHWM:") > 0
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: str, setup: Callable[[], object] | None = None) -> int | None:
    """Peak memory above the level before the call (results included while alive)."""
    if setup is not None:
        setup()
    gc.collect()
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak
    if not _can_track_cpu_peak():
        return None
    set_allocator_phase("memory")
    before = _rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    peak = _rss_kb("VmHWM:") - before
    del out
    set_allocator_phase("timing")
    return max(peak, 0) * 1024


def time_call(impl: Impl, device: str) -> float:
    """Seconds of one call (its untimed setup first)."""
    if impl.setup is not None:
        impl.setup()
    _sync(device)
    start = time.perf_counter()
    out = impl.fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


# Fast cases get more samples: a handful of sub-millisecond calls is at the mercy of
# one preemption or thread wake-up on a shared machine (the quick table's small rows
# moved by 0.8-1.2x between runs with 5 samples).  Up to FAST_SAMPLES rounds, within
# about FAST_BUDGET_S seconds of calls per case.
FAST_SAMPLES = 200
FAST_BUDGET_S = 1.0


def time_interleaved(impls: list[Impl], device: str, warmup: int, repeats: int) -> list[list[float]]:
    """Per implementation, the seconds of its timed calls.  The calls run in rounds, one
    call of each implementation per round, so that load from other processes falls on
    all of them alike; cases whose round is short get more rounds (FAST_SAMPLES)."""
    last = [0.0] * len(impls)
    for _ in range(max(warmup, 1)):
        last = [time_call(impl, device) for impl in impls]
    round_s = sum(last)
    if round_s > 0:
        repeats = max(repeats, min(FAST_SAMPLES, int(FAST_BUDGET_S / round_s)))
    times: list[list[float]] = [[] for _ in impls]
    for _ in range(repeats):
        for impl, samples in zip(impls, times):
            samples.append(time_call(impl, device))
    return times


def measure_read_roof(device: str, quick: bool) -> float:
    """Bytes per second of a large reduction (torch.sum over 256 MiB, beyond any cache)."""
    n = 256 * 2**20 // 4
    x = torch.ones(n, device=device)
    for _ in range(2):
        x.sum()
    times = []
    for _ in range(5 if quick else 10):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        times.append(time.perf_counter() - start)
    return n * 4 / statistics.median(times)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    import rlkernels

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = rlkernels.info()
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "rlkernels": rlkernels.__version__,
        "backends": info["backends"],
        "triton": info.get("triton_version"),
        "commit": commit or "unknown",
        "allocator": {**{k: os.environ.get(k, "(unset)") for k in ALLOCATOR_ENV},
                      **{f"mallopt_{phase}": v for phase, v in MALLOPT.items()}},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return env


def run_case(case: Case, device: str, roof: float, quick: bool) -> dict:
    warmup, repeats = (1, 5) if quick else (3, 15)
    if case.repeats is not None and not quick:
        warmup, repeats = case.repeats
    results = []
    for impl, times in zip(case.impls, time_interleaved(case.impls, device, warmup, repeats)):
        median = statistics.median(times)
        results.append({
            "label": impl.label,
            "baseline": impl.baseline,
            "median_ms": median * 1e3,
            "gbps": case.bytes_moved / median / 1e9 if case.bytes_moved else None,
            "roof_fraction": case.bytes_moved / median / roof if case.bytes_moved else None,
            "peak_extra_mb": (lambda b: None if b is None else b / 2**20)(peak_extra_bytes(impl.fn, device, impl.setup)),
        })
    for row in results:
        row["speedup_vs"] = {b["label"]: b["median_ms"] / row["median_ms"] for b in results if b["baseline"]}
        row["memory_vs"] = {b["label"]: (row["peak_extra_mb"] / b["peak_extra_mb"]
                                          if b["peak_extra_mb"] and row["peak_extra_mb"] is not None else None)
                            for b in results if b["baseline"]}
    return {"family": case.family, "name": case.name, "params": case.params, "bytes_moved": case.bytes_moved,
            "results": results}


def timed_rows(timings: list[tuple[str, bool, float]], bytes_moved: int = 0) -> list[dict]:
    """Result rows of implementations timed outside run_case (their own processes or
    timing loops): (label, is_baseline, median seconds) each, ratios against the
    baselines, no memory column."""
    results = [{"label": label, "baseline": baseline, "median_ms": seconds * 1e3,
                "gbps": bytes_moved / seconds / 1e9 if bytes_moved else None, "roof_fraction": None,
                "peak_extra_mb": None} for label, baseline, seconds in timings]
    for row in results:
        row["speedup_vs"] = {b["label"]: b["median_ms"] / row["median_ms"] for b in results if b["baseline"]}
        row["memory_vs"] = {b["label"]: None for b in results if b["baseline"]}
    return results


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; rlkernels {env['rlkernels']} "
        f"(commit {env['commit']}); {env['date']}",
        f"Allocator: {', '.join(f'{k}={v}' for k, v in env['allocator'].items())}",
        f"Measured read roof: {report['roof_gbps']:.1f} GB/s",
        "",
        "| case | params | impl | median ms | GB/s | % roof | peak extra MB | speedup vs baselines | memory vs baselines |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for case in report["cases"]:
        params = ", ".join(f"{k}={v}" for k, v in case["params"].items())
        for row in case["results"]:
            speed = "; ".join(f"{v:.2f}x vs {k}" for k, v in row["speedup_vs"].items() if k != row["label"])
            mem = "; ".join(f"{v:.2f} of {k}" for k, v in row["memory_vs"].items()
                            if k != row["label"] and v is not None)
            gbps = f"{row['gbps']:.1f}" if row["gbps"] is not None else "-"
            roof = f"{100 * row['roof_fraction']:.0f}%" if row["roof_fraction"] is not None else "-"
            peak = f"{row['peak_extra_mb']:.1f}" if row["peak_extra_mb"] is not None else "-"
            label = row["label"] + (" (baseline)" if row["baseline"] else "")
            lines.append(f"| {case['family']}/{case['name']} | {params} | {label} | {row['median_ms']:.3f} | "
                         f"{gbps} | {roof} | {peak} | {speed or '-'} | {mem or '-'} |")
    return "\n".join(lines) + "\n"
