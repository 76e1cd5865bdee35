"""rlkernels.distributed on real multi-process gloo groups (2, 3 and 4 ranks on
this machine), plus the single-process cases: no process group, bad arguments and
a one-rank group.

Each world size spawns one group that runs every check in tests/distributed_checks.py
(start-up paid once); each check is reported as its own test.  Every group has an
explicit process-group timeout and a wall-clock deadline after which its ranks are
killed, so no test can hang."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import distributed_checks
from rlkernels.distributed import DecentralizedAverager, average_parameters, gossip_average, ring_all_reduce
from support import RankSuites

WORLD_SIZES = [2, 3, 4]
SUITE_DEADLINE_S = 150.0
PG_TIMEOUT_S = 30.0
SUITES = RankSuites(distributed_checks.run_suite, distributed_checks.CHECKS, timeout_s=SUITE_DEADLINE_S,
                    pg_timeout_s=PG_TIMEOUT_S)


@pytest.mark.parametrize("name", list(distributed_checks.CHECKS))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_multi_rank(world, name):
    SUITES.check(world, name)


# Faults (dead, stalled and mismatched ranks): tests/test_distributed_faults.py.


# ---- single process ------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: average_parameters([torch.ones(3)]),
    lambda: ring_all_reduce(torch.ones(3)),
    lambda: gossip_average(torch.ones(3)),
    lambda: DecentralizedAverager(torch.nn.Linear(2, 2)),
], ids=["average_parameters", "ring_all_reduce", "gossip_average", "DecentralizedAverager"])
def test_uninitialised_process_group_is_a_clear_error(call):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="default process group is not initialised; call "
                                           r"torch.distributed.init_process_group"):
        call()


@pytest.mark.parametrize("call,error,match", [
    (lambda: average_parameters([torch.ones(3)], op="max"), ValueError, r"op must be one of \('mean', 'sum'\)"),
    (lambda: average_parameters([torch.ones(3)], bucket_mb=0), ValueError, "bucket_mb must be > 0.0"),
    (lambda: average_parameters([torch.ones(3)], compress="int8"), ValueError, "compress must be None, 'bf16' or"),
    (lambda: average_parameters([torch.ones(3, dtype=torch.int64)]), TypeError, r"params\[0\] must be floating"),
    (lambda: average_parameters([torch.ones(3), 4]), TypeError, r"params\[1\] must be a torch.Tensor"),
    (lambda: average_parameters(3.0), TypeError, "params must be an nn.Module, a tensor or an iterable"),
    (lambda: ring_all_reduce([torch.ones(3)]), TypeError, "tensor must be a torch.Tensor"),
    (lambda: ring_all_reduce(torch.ones(3), op="avg"), ValueError, "op must be one of"),
    (lambda: ring_all_reduce(torch.ones(3), segment_mb=-1), ValueError, "segment_mb must be > 0.0"),
    (lambda: gossip_average(torch.ones(3, dtype=torch.int32)), TypeError, r"params\[0\] must be floating"),
    (lambda: DecentralizedAverager("model"), TypeError, "module must be a torch.nn.Module"),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), mode="star"), ValueError, "mode must be one of"),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), every=0), ValueError, "every must be an integer >= 1"),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), alpha=0), ValueError, "alpha must be > 0.0"),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), mode="gossip", alpha=1.5), ValueError,
     "alpha must be <= 1.0"),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), average_optimizer_state=True), ValueError,
     "average_optimizer_state=True needs optimizer="),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), optimizer="adam"), TypeError,
     "optimizer must be a torch.optim.Optimizer"),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), weights=(0.5, 0.25, 0.25)), ValueError,
     "weights apply to mode='gossip' only"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_one_rank_group_is_identity(one_rank_group):
    x = torch.randn(10)
    kept = x.clone()
    ring_all_reduce(x)
    average_parameters([x], compress="bf16")
    gossip_average(x)
    assert torch.equal(x, kept)
    with pytest.raises(ValueError, match="weights must sum to 1"):
        gossip_average(x, weights=(1.0, 0.5, 0.0))
    model = torch.nn.Linear(3, 2).double()
    averager = DecentralizedAverager(model, alpha=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert averager.step()
    for p, s in zip(model.parameters(), start):  # theta + 0.5 * delta with one agent
        torch.testing.assert_close(p.detach(), s + 0.5)


def test_torchrun_example():
    """python/decentralized_agents.py under torchrun (2 agents, ring mode): after the
    last round every agent holds the same parameters."""
    import ast
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(root, "python", "decentralized_agents.py"), "--mode", "ring", "--steps", "8", "--timeout", "60"],
        capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = ast.literal_eval(next(line for line in proc.stdout.splitlines() if line.startswith("{'rank': 0")))
    assert summary["rounds"] == 2 and summary["world"] == 2
    assert summary["max_param_spread"] == 0.0


def test_torchrun_cli_decentralized(tmp_path):
    """`torchrun -m rlkernels train decentralized`: each process is one agent in the
    process group the trainer creates (and destroys); both finish cleanly."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "rlkernels", "train", "decentralized", "--steps", "2", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("decentralized: 2 steps") == 2, proc.stdout[-2000:]
