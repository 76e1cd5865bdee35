"""rlkernels.distributed.vocab_parallel on 2 and 4 gloo ranks: log-probs, entropy,
KL, the lm-head ops and their gradients against the unsharded ops; mismatched
ranks, a killed rank and a stalled rank (tests/vocab_parallel_checks.py)."""
from __future__ import annotations

import pytest
import torch

import vocab_parallel_checks as C
from rlkernels.distributed import vocab_parallel as VP
from rlkernels.distributed._launch import run_ranks
from support import RankSuites

WORLD_SIZES = [2, 4]
SUITES = RankSuites(C.run_suite, C.CHECKS, timeout_s=300, pg_timeout_s=60)


@pytest.mark.parametrize("name", list(C.CHECKS))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_multi_rank(world, name):
    SUITES.check(world, name)


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_dead_or_stalled_rank_is_an_error_on_the_others(fault):
    results = run_ranks(C.fault_worker, 3, args=(fault,), timeout_s=60, pg_timeout_s=30)
    for r in results:
        if r.rank == 1:
            continue
        assert r.ok, r.error
        assert r.value["error"] and r.value["error"].startswith("VocabParallelError"), r.value
        assert "rank" in r.value["error"] and "No output was written" in r.value["error"]
        assert r.value["seconds"] < 20


def test_merge_matches_the_full_row_in_float64():
    # the merge algebra alone: statistics of arbitrary splits of one row give the row's values
    g = torch.Generator().manual_seed(0)
    row = torch.randn(3, 50, generator=g, dtype=torch.float64) * 4
    labels = torch.tensor([3, 49, 20])
    T = 0.8
    parts = []
    for lo, hi in ((0, 7), (7, 7), (7, 31), (31, 50)):
        x = row[:, lo:hi]
        m = x.amax(-1) if hi > lo else torch.full((3,), -torch.inf, dtype=torch.float64)
        shift = torch.where(m == -torch.inf, 0.0, m)
        y = (x - shift[:, None]) * (1.4426950408889634 / T)
        e = torch.exp2(y)
        owned = (labels >= lo) & (labels < hi)
        label = torch.where(owned, row.gather(1, labels[:, None])[:, 0], 0.0)
        parts.append(torch.stack([m, e.sum(-1), (e * y).sum(-1), label, owned.double()], -1))
    lp, h, saved = VP.merge_softmax_stats(torch.stack(parts), T, torch.ones(3, dtype=torch.bool))
    logp = torch.log_softmax(row / T, -1)
    torch.testing.assert_close(lp.double(), logp.gather(1, labels[:, None])[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.double(), -(logp.exp() * logp).sum(-1), rtol=1e-6, atol=1e-6)


def test_a_label_no_shard_owns_is_nan_not_a_number():
    stats = torch.zeros(2, 1, 5)
    stats[:, :, 1] = 1.0  # s = 1 on both shards; owned = 0 on both
    lp, _, _ = VP.merge_softmax_stats(stats, 1.0, torch.ones(1, dtype=torch.bool))
    assert torch.isnan(lp).all()


def test_traffic_is_linear_in_tokens():
    assert VP.traffic_bytes(1000, 4) == 1000 * VP.STAT_WIDTH * 4 * 3


def test_example_runs_under_torchrun():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(root, "python", "vocab_parallel.py"), "--steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_bench_family_reports_traffic_saved():
    from rlkernels.benchmarks import vocab_parallel as B

    rows = B.run("cpu", quick=True)
    assert {r["name"] for r in rows} == {"vocab_parallel logprobs fwd+bwd", "vocab_parallel kl_from_logits fwd"}
    for r in rows:
        assert r["params"]["received_mb_vocab_parallel"] < r["params"]["received_mb_all_gather"]
        assert all(x["median_ms"] > 0 for x in r["results"])
