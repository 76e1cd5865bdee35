"""`make gpu-check`: everything only a GPU can tell, in one call, in under 8 minutes.

For the day a GPU is lent: on a bare, offline machine (Python, torch with CUDA, Triton,
nvcc; ninja, setuptools and pybind11 as found; nothing downloaded) it

  1. records the machine (GPU, capability, driver, torch, Triton, nvcc),
  2. builds the extension in place for this GPU's architecture only,
  3. runs every op x {cuda, triton} x dtype against the reference, with gradients and
     opcheck (.ci/gpu_ops_check.py: needs no pytest), then every op with no host sync:
     under torch.cuda.set_sync_debug_mode("error") and captured in a CUDA graph
     (.ci/gpu_sync_check.py),
  4. runs the op test files' CUDA and Triton cases with pytest, where pytest is installed,
  5. runs compute-sanitizer memcheck and racecheck over the CUDA kernels (tiny shapes),
  6. runs `rlkernels bench --device cuda --quick`,
  7. times rlkernels against Liger-Kernel where `liger_kernel` is importable,

and writes report.md and report.json into $RLKERNELS_GPU_REPORT (default gpu-report/).
Each step has its own time limit and the whole run a budget; a step that would start
past the budget is reported as skipped.  `--dry-run` runs none of the commands (no GPU
needed): it checks the arguments, runs the machine probe, lists the other steps and
writes the report, which is how CI keeps this script from rotting.

    python3 .ci/gpu_check.py [--out DIR] [--budget SECONDS] [--only STEP ...] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("machine", "build", "ops", "syncs", "pytest", "memcheck", "racecheck", "bench", "liger")
OP_TEST_FILES = ("test_gae.py", "test_group_advantages.py", "test_masked.py", "test_kl_from_logits.py",
                 "test_kl_penalty.py", "test_linear_logprobs.py", "test_linear_ppo_loss.py", "test_logprobs.py",
                 "test_policy_loss.py", "test_value_loss.py", "test_preference.py", "test_multi_tensor.py",
                 "test_triton_gpu_semantics.py", "test_cuda_kernels.py")


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: int
    why: str
    env: dict = field(default_factory=dict)
    status: str = "pending"   # passed | failed | timeout | skipped | dry-run
    seconds: float = 0.0
    output_tail: str = ""
    note: str = ""


def machine_probe() -> str:
    return r"""
import json, os, shutil, subprocess, torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpus": []}
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)})
try:
    import triton; info["triton"] = triton.__version__
except Exception as exc:
    info["triton"] = f"not importable: {exc}"
for tool in ("nvcc", "ninja", "compute-sanitizer", "nvidia-smi"):
    info[tool] = shutil.which(tool)
if info["nvidia-smi"]:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
for mod in ("pytest", "hypothesis", "pybind11", "setuptools", "liger_kernel", "transformers", "numpy"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "present")
    except Exception:
        info[mod] = None
print(json.dumps(info, indent=1))
"""


def gpu_arch(python: str) -> str | None:
    """The visible GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it ("9.0")."""
    try:
        out = subprocess.run([python, "-c", "import torch; p = torch.cuda.get_device_capability(); "
                                            "print(f'{p[0]}.{p[1]}')"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def plan(args, arch: str | None) -> list[Step]:
    py = args.python
    out = args.out
    sanitizer = shutil.which("compute-sanitizer") or "compute-sanitizer"
    smoke = [py, ".ci/gpu_ops_check.py", "--device", "cuda", "--backends", "cuda", "--smoke", "--no-opcheck",
             "--dtypes", "float32", "bfloat16"]
    steps = [
        Step("machine", [py, "-c", machine_probe()], 60, "the GPU, driver and software this report is about"),
        Step("build", [py, "setup.py", "build_ext", "--inplace"], 360, "the extension for this GPU only",
             env={"RLKERNELS_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch or "native",
                  "MAX_JOBS": str(max(1, min(16, os.cpu_count() or 1)))}),
        Step("ops", [py, ".ci/gpu_ops_check.py", "--device", "cuda", "--backends", "cuda", "triton",
                     "--json", os.path.join(out, "ops.json")], 240,
             "every op x {cuda, triton} x dtype against the reference, gradients, opcheck"),
        Step("syncs", [py, ".ci/gpu_sync_check.py", "--backends", "cuda", "triton",
                       "--json", os.path.join(out, "syncs.json")], 180,
             "every op x {cuda, triton} with no host sync: sync debug mode \"error\", CUDA graph capture"),
        Step("pytest", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cuda or triton",
                        "--junitxml", os.path.join(out, "pytest.xml")]
             + [os.path.join("tests", f) for f in OP_TEST_FILES], 240,
             "the op tests' CUDA and compiled-Triton cases"),
        Step("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--target-processes", "all"]
             + smoke, 150, "out-of-bounds and misaligned accesses in the CUDA kernels"),
        Step("racecheck", [sanitizer, "--tool", "racecheck", "--error-exitcode", "3", "--target-processes", "all"]
             + smoke, 150, "shared-memory races in the CUDA kernels"),
        Step("bench", [py, "-m", "rlkernels", "bench", "--device", "cuda", "--quick", "--out",
                       os.path.join(out, "bench")], 240, "speed and memory against the PyTorch baselines"),
        Step("liger", [py, ".ci/gpu_liger.py", "--json", os.path.join(out, "liger.json")], 120,
             "linear log-probs against Liger-Kernel's fused linear cross-entropy, where installed"),
    ]
    return [s for s in steps if not args.only or s.name in args.only]


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run_step(step: Step, budget_end: float, dry_run: bool) -> None:
    if dry_run and step.name != "machine":  # the probe needs no GPU: a dry run runs it too
        step.status = "dry-run"
        return
    left = budget_end - time.monotonic()
    if left < 10:
        step.status, step.note = "skipped", "out of the time budget"
        return
    limit = int(min(step.timeout, left))
    started = time.monotonic()
    try:
        # the in-place build is imported from the checkout, whatever else is installed
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        done = subprocess.run(step.command, cwd=ROOT, env={**os.environ, "PYTHONPATH": path, **step.env},
                              capture_output=True, text=True, timeout=limit)
        step.output_tail = tail(done.stdout + done.stderr)
        step.status = "passed" if done.returncode == 0 else "failed"
        if done.returncode != 0:
            step.note = f"exit status {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        step.output_tail = tail(out.decode(errors="replace") if isinstance(out, bytes) else out)
        step.status, step.note = "timeout", f"stopped after {limit} s"
    except OSError as exc:
        step.status, step.note = "skipped", f"cannot run: {exc}"
    step.seconds = round(time.monotonic() - started, 1)


def write_report(out: str, steps: list[Step], meta: dict) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    md_path, json_path = os.path.join(out, "report.md"), os.path.join(out, "report.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "steps": [asdict(s) for s in steps]}, f, indent=1)
    lines = [f"# rlkernels GPU check: {meta.get('gpu') or 'no GPU (dry run)'}", "",
             f"Commit {meta.get('commit')}, {meta.get('date')}, {meta.get('seconds', 0):.0f} s in all"
             f"{' (dry run: nothing was run)' if meta.get('dry_run') else ''}.", "",
             "| step | status | seconds | what it checks | note |", "|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds} | {s.why} | {s.note} |")
    lines += [""]
    for s in steps:
        lines += [f"## {s.name}", "", "```", " ".join(s.command if s.name != "machine" else s.command[:2] + ["<probe>"]),
                  "```", ""]
        if s.output_tail:
            lines += ["```", s.output_tail.rstrip(), "```", ""]
    bench_md = os.path.join(out, "bench", "results.md")
    if os.path.exists(bench_md):
        lines += ["## Benchmark table", "", open(bench_md).read()]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path, json_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("RLKERNELS_GPU_REPORT", "gpu-report"),
                   help="report folder (default: $RLKERNELS_GPU_REPORT or gpu-report)")
    p.add_argument("--budget", type=int, default=470, help="seconds for the whole run (default 470)")
    p.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    p.add_argument("--python", default=sys.executable, help="the interpreter to build and test with")
    p.add_argument("--dry-run", action="store_true", help="run nothing; list the steps and write the report")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be a positive number of seconds")
    args.out = os.path.abspath(args.out)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a folder")

    started = time.monotonic()
    arch = None if args.dry_run else gpu_arch(args.python)
    if not args.dry_run and arch is None:
        print("gpu-check: no GPU is visible to torch (use --dry-run to check the script itself)", file=sys.stderr)
        return 2
    steps = plan(args, arch)
    os.makedirs(args.out, exist_ok=True)
    budget_end = started + args.budget
    for step in steps:
        if step.name == "liger" and not args.dry_run and not _importable(args.python, "liger_kernel"):
            step.status, step.note = "skipped", "liger_kernel is not installed"
            continue
        if step.name == "pytest" and not args.dry_run and not _importable(args.python, "pytest"):
            step.status, step.note = "skipped", "pytest is not installed (the ops step covers every op)"
            continue
        if step.name in ("memcheck", "racecheck") and not args.dry_run and not shutil.which(step.command[0]):
            step.status, step.note = "skipped", "compute-sanitizer not found"
            continue
        if step.name != "build" and not args.dry_run and any(s.name == "build" and s.status != "passed"
                                                               for s in steps):
            step.status, step.note = "skipped", "the build failed"
            continue
        print(f"gpu-check: {step.name} ({step.why})", flush=True)
        run_step(step, budget_end, args.dry_run)
        print(f"gpu-check: {step.name}: {step.status} {step.note} ({step.seconds} s)", flush=True)
    meta = {"gpu": _gpu_name(steps), "arch": arch, "commit": _commit(), "dry_run": args.dry_run,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "seconds": round(time.monotonic() - started, 1), "budget": args.budget}
    md, js = write_report(args.out, steps, meta)
    print(f"gpu-check: report in {md} and {js}")
    bad = [s.name for s in steps if s.status in ("failed", "timeout")]
    if bad:
        print(f"gpu-check: failed: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def _importable(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def _gpu_name(steps: list[Step]) -> str | None:
    for s in steps:
        if s.name == "machine" and s.status == "passed":
            try:
                gpus = json.loads(s.output_tail[s.output_tail.index("{"):])["gpus"]
                return ", ".join(g["name"] for g in gpus) or None
            except (ValueError, KeyError):
                return None
    return None


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
