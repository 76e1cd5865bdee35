"""`rlkernels train <trainer> --compare`: the same trainer, config and seed, run for a
few steps with the rlkernels kernels and with the pure-PyTorch references, each in a
fresh process, reporting step time and peak memory side by side.

Step time is the median over the steps after the first (which pays one-off costs).
Peak memory is the process's peak resident set during training, measured from the
kernel's high-water mark (reset after setup via /proc/self/clear_refs where Linux
allows it, so it excludes model building), and on CUDA the peak allocated memory.
Decentralized runs report agent 0's step time; their memory lives in the agent
processes and is not measured."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

from .kernels import KERNEL_SETS

_MARK = "RLKERNELS_COMPARE_RESULT "


def _hwm_kb() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return int(re.search(r"VmHWM:\s+(\d+)", fh.read()).group(1))
    except (OSError, AttributeError):
        return None


def _rss_kb() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))
    except (OSError, AttributeError):
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(name: str, config: dict, out: str | None) -> dict:
    """Runs the trainer in this process and measures it (the child side)."""
    import torch

    from . import make_config, trainer_class

    config = make_config(name, config)
    if name == "decentralized":
        from .decentralized import train_decentralized

        metrics = train_decentralized(config, out)
        times = [m["step_time"] for m in metrics]
        return {"step_times": times, "peak_rss_mb": None, "setup_rss_mb": None, "cuda_peak_mb": None,
                "reward": metrics[-1].get("reward") if metrics else None}
    trainer = trainer_class(name)(config, out)
    cuda = trainer.device.type == "cuda"
    setup_rss = _rss_kb()
    reset = _reset_hwm()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    trainer.run()
    if cuda:
        torch.cuda.synchronize()
    peak = _hwm_kb()
    return {"step_times": [m["step_time"] for m in trainer.metrics],
            "peak_rss_mb": peak / 1024 if peak is not None else None,
            "setup_rss_mb": setup_rss / 1024 if setup_rss is not None else None,
            "peak_includes_setup": not reset,
            "cuda_peak_mb": (torch.cuda.max_memory_allocated() - cuda_base) / 2**20 if cuda else None,
            "reward": trainer.metrics[-1].get("reward") if trainer.metrics else None}


def compare(name: str, config: dict, *, steps: int, out: str | None = None, echo=print) -> list[dict]:
    """Runs `name` for `steps` steps with each kernel set in a fresh process; returns
    one result dict per kernel set and prints a table through `echo`."""
    results = []
    for kernels in KERNEL_SETS:
        child_config = {**config, "kernels": kernels, "steps": steps, "progress": False, "plot": False}
        child_out = os.path.join(out, f"compare-{kernels}") if out else None
        payload = json.dumps({"name": name, "config": child_config, "out": child_out})
        echo(f"[compare] {name} with kernels={kernels}: {steps} steps ...")
        proc = subprocess.run([sys.executable, "-m", "rlkernels.trainers.compare", payload],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"compare: the {kernels} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(lines[-1][len(_MARK):])
        result["kernels"] = kernels
        times = result["step_times"][1:] or result["step_times"]
        result["median_step_s"] = statistics.median(times) if times else float("nan")
        results.append(result)
    echo(format_table(name, steps, results))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "compare.json"), "w", encoding="utf-8") as fh:
            json.dump({"trainer": name, "steps": steps, "results": results}, fh, indent=1)
    return results


def _fmt(value, spec=".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(name: str, steps: int, results: list[dict]) -> str:
    rows = [f"{name}: {steps} steps per kernel set (median step time over steps 2..{steps})",
            f"{'kernels':<11} {'step time (s)':>14} {'peak RSS (MB)':>14} {'RSS after setup (MB)':>21} "
            f"{'CUDA peak (MB)':>15} {'last reward':>12}"]
    for r in results:
        rows.append(f"{r['kernels']:<11} {r['median_step_s']:>14.4f} {_fmt(r['peak_rss_mb']):>14} "
                    f"{_fmt(r['setup_rss_mb']):>21} {_fmt(r['cuda_peak_mb']):>15} {_fmt(r['reward'], '.4g'):>12}")
    by = {r["kernels"]: r for r in results}
    if "rlkernels" in by and "reference" in by and by["rlkernels"]["median_step_s"] > 0:
        ratio = by["reference"]["median_step_s"] / by["rlkernels"]["median_step_s"]
        rows.append(f"step time: reference / rlkernels = {ratio:.2f}x")
    if any(r.get("peak_includes_setup") for r in results):
        rows.append("(peak RSS includes setup: this system does not allow resetting the high-water mark)")
    return "\n".join(rows)


def _child_main(argv: list[str]) -> None:
    request = json.loads(argv[0])
    result = measure(request["name"], request["config"], request["out"])
    print(_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
