"""The GPU check's CPU-side parts (`make gpu-check`, .ci/gpu_check.py): argument
handling, the report writer in dry-run mode, and the op matrix (.ci/gpu_ops_check.py)
run on the CPU backends so it cannot rot between the days a GPU is lent."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from support import TRITON_ON_CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, ".ci", "gpu_check.py")
OPS = os.path.join(ROOT, ".ci", "gpu_ops_check.py")
SYNCS = os.path.join(ROOT, ".ci", "gpu_sync_check.py")


def run(script, *args, env=None):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "report"
    done = run(CHECK, "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert names == ["machine", "build", "ops", "syncs", "pytest", "memcheck", "racecheck", "bench", "liger"]
    machine = report["steps"][0]
    assert machine["status"] == "passed", machine
    assert json.loads(machine["output_tail"][machine["output_tail"].index("{"):])["torch"] == torch.__version__
    assert all(s["status"] == "dry-run" for s in report["steps"][1:])
    assert report["meta"]["dry_run"] is True
    md = (out / "report.md").read_text()
    for name in names:
        assert f"| {name} | " in md


def test_report_folder_from_the_environment(tmp_path):
    out = tmp_path / "from-env"
    done = run(CHECK, "--dry-run", "--only", "ops", "bench", env={"RLKERNELS_GPU_REPORT": str(out)})
    assert done.returncode == 0, done.stderr
    steps = json.loads((out / "report.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["ops", "bench"]


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget"),
    (["--only", "nonsense"], "--only"),
])
def test_bad_arguments_exit_2_naming_the_flag(args, message):
    done = run(CHECK, "--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    done = run(CHECK, "--dry-run", "--out", str(target))
    assert done.returncode == 2 and "--out" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_says_so():
    done = run(CHECK, "--out", os.devnull + "-unused")
    assert done.returncode == 2 and "no GPU" in done.stderr


def _ops_module():
    spec = importlib.util.spec_from_file_location("gpu_ops_check", OPS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_op_matrix_comparison_catches_errors():
    ops = _ops_module()
    truth = torch.randn(100, dtype=torch.float64)
    assert ops._compare("x", truth.float(), truth) is None
    assert ops._compare("x", truth.float() + 1e-2, truth) is not None
    assert ops._compare("x", truth.bfloat16(), truth) is None
    assert ops._compare("x", (truth * 1.05).bfloat16(), truth) is not None
    nan = truth.clone()
    nan[3] = float("nan")
    assert ops._compare("x", nan.float(), truth) is not None
    assert ops._compare("x", truth.float(), nan) is not None
    assert ops._compare("x", truth[:99].float(), truth) is not None
    # 16-bit: up to twice PyTorch's own error in that dtype
    same = truth + 0.5
    assert ops._compare("x", (truth + 0.9).bfloat16(), truth, same) is None
    assert ops._compare("x", (truth + 1.5).bfloat16(), truth, same) is not None


def test_op_matrix_lists_every_public_op():
    import rlkernels

    done = run(OPS, "--list", "--device", "cpu", "--backends", "cpu")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines()}
    public = {name for name in rlkernels.__all__ if callable(getattr(rlkernels, name)) and name not in
              ("info", "unpack_tensors")}
    assert public <= listed, f"ops without a GPU-check case: {sorted(public - listed)}"


@pytest.mark.parametrize("backends", [["cpu"]] + ([["triton"]] if TRITON_ON_CPU else []))
def test_op_matrix_runs_on_the_cpu(backends):
    done = run(OPS, "--device", "cpu", "--smoke", "--backends", *backends, "--ops", "logprobs", "ppo_loss", "gae",
               "dpo_loss", env={"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 failed" in done.stdout


def test_sync_check_lists_every_public_op():
    import rlkernels

    done = run(SYNCS, "--list")
    assert done.returncode == 0, done.stderr
    assert {line.split()[0] for line in done.stdout.splitlines()} == set(rlkernels.ops.__all__)
    if not torch.cuda.is_available():
        done = run(SYNCS, "--ops", "gae")
        assert done.returncode == 2 and "no GPU" in done.stderr
