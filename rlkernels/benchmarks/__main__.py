"""python -m rlkernels.benchmarks [--ops FAMILY ...] [--device cpu|cuda] [--quick] [--out DIR]

Re-executes itself once under the fixed allocator settings of
rlkernels.benchmarks.harness.ALLOCATOR_ENV (read at start-up), unless they are already
set; then runs every case and writes JSON and Markdown."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    from . import FAMILIES

    p = argparse.ArgumentParser(prog="rlkernels bench", description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", default=None, help=f"families to run (default: all): {sorted(FAMILIES)}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--out", default="bench-results", help="directory for results.json and results.md")
    return p


def _ensure_allocator_env(argv: list[str]) -> None:
    from .harness import ALLOCATOR_ENV

    if os.environ.get("RLK_BENCH_CHILD") == "1" or all(k in os.environ for k in ALLOCATOR_ENV):
        return
    env = dict(os.environ)
    for key, value in ALLOCATOR_ENV.items():
        env.setdefault(key, value)
    env["RLK_BENCH_CHILD"] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "rlkernels.benchmarks", *argv], env)


def _device_problem(device: str, torch) -> str | None:
    """Why the benchmarks cannot run on `device` ("cpu", "cuda" or "cuda:N"), or None."""
    if device == "cpu":
        return None
    index = device[len("cuda:"):] if device.startswith("cuda:") else "0" if device == "cuda" else None
    if index is None or not index.isdigit():
        return "must be cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return "no GPU is visible"
    if int(index) >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} GPU(s) are visible"
    return None


def _out_problem(out: str) -> str | None:
    """Why results cannot be written under directory `out`, or None."""
    if not out:
        return "must name a directory"
    if os.path.exists(out) and not os.path.isdir(out):
        return "exists and is not a directory"
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent if not os.path.isdir(out) else out, os.W_OK):
        return "cannot be written"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _ensure_allocator_env(argv)

    import torch

    from . import FAMILIES
    from .harness import environment, markdown, measure_read_roof, run_case, set_allocator_phase

    set_allocator_phase("timing")

    device = args.device if args.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    problem = _device_problem(device, torch)
    if problem:
        print(f"rlkernels bench: --device {device!r}: {problem}", file=sys.stderr)
        return 2
    problem = _out_problem(args.out)
    if problem:  # found now, not after every benchmark has run
        print(f"rlkernels bench: --out {args.out!r}: {problem}", file=sys.stderr)
        return 2
    families = args.ops or sorted(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"rlkernels bench: unknown --ops {unknown}; known: {sorted(FAMILIES)}", file=sys.stderr)
        return 2
    roof = measure_read_roof(device, args.quick)
    report = {"environment": environment(device), "roof_gbps": roof / 1e9, "quick": args.quick, "cases": []}
    print(f"# rlkernels bench on {report['environment']['device']} (read roof {roof / 1e9:.1f} GB/s)", flush=True)
    for family in families:
        module = importlib.import_module(FAMILIES[family])
        runner = getattr(module, "run", None)
        if runner is not None:  # families that drive their own processes (distributed)
            report["cases"].extend(runner(device, args.quick))
            continue
        for case in module.cases(device, args.quick):
            result = run_case(case, device, roof, args.quick)
            report["cases"].append(result)
            best = ", ".join(f"{r['label']} {r['median_ms']:.3f} ms" for r in result["results"])
            print(f"{family}/{case.name} {case.params}: {best}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
