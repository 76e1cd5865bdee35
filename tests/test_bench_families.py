"""The benchmark families that time in their own way: `overhead` (per-call cost of
every public op) and `busy` (threads under load, with processes it starts itself)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import rlkernels
from rlkernels.benchmarks import FAMILIES, busy, overhead
from rlkernels.benchmarks.harness import markdown


def test_overhead_covers_every_public_op():
    names = {s.name for s in overhead.specs()}
    assert names == set(rlkernels.ops.__all__)


def test_overhead_rows_time_ours_against_composed_and_native():
    rows = overhead.run("cpu", quick=True)
    by_name = {r["name"]: r for r in rows}
    for spec in overhead.specs():
        assert f"{spec.name} fwd" in by_name
        assert (f"{spec.name} fwd+bwd" in by_name) == bool(spec.grad)
    for r in rows:
        labels = [x["label"] for x in r["results"]]
        assert labels == ["rlkernels", "composed", "native"]
        assert all(x["median_ms"] > 0 for x in r["results"])
        o = r["overhead"]
        ours, composed, native = (x["median_ms"] for x in r["results"])
        assert o["vs_composed"] == pytest.approx(ours / composed)
        assert o["above_native_us"] == pytest.approx((ours - native) * 1e3)
        assert o["meets_goal"] == (ours <= overhead.GOAL_RATIO * composed
                                   and (ours - native) * 1e3 <= overhead.GOAL_EXTRA_US)
    missed = overhead.summary(rows)
    assert len(missed) == sum(not r["overhead"]["meets_goal"] for r in rows)
    assert torch.get_num_threads() >= 1


def test_overhead_ops_with_gradients_are_timed_backward():
    # a spec that names gradient inputs must produce an output that needs them
    for spec in overhead.specs():
        inputs = spec.make(torch.Generator().manual_seed(0), "cpu")
        out = overhead._first_tensor(spec.ours(inputs))
        assert (out is not None and out.requires_grad) == bool(spec.grad), spec.name


def test_busy_processes_stop_by_themselves():
    with busy.busy_cores(1, seconds=0.5) as procs:
        (p,) = procs
        start = time.monotonic()
        p.wait(timeout=30)
        assert time.monotonic() - start < 30 and p.returncode == 0


def test_busy_processes_are_killed_on_exit():
    with busy.busy_cores(2, seconds=600) as procs:
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_busy_family_reports_both_thread_counts():
    rows = busy.run("cpu", quick=True)
    assert {r["name"] for r in rows} >= {"gae", "ppo_loss fwd+bwd", "torch softmax"}
    for r in rows:
        one, many = r["results"]
        assert one["label"] == "1 thread" and one["baseline"] and not many["baseline"]
        assert r["busy"]["ratio"] == pytest.approx(many["median_ms"] / one["median_ms"])
    table = markdown({"environment": {"device": "cpu", "torch": "", "triton": "", "rlkernels": "", "commit": "",
                                      "date": "", "allocator": {}}, "roof_gbps": 1.0, "cases": rows})
    assert "busy/gae" in table


def test_families_registered():
    assert FAMILIES["overhead"] == "rlkernels.benchmarks.overhead"
    assert FAMILIES["busy"] == "rlkernels.benchmarks.busy"


def test_bench_cli_runs_overhead(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlkernels", "bench", "--ops", "overhead", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "overhead/logprobs fwd+bwd" in (tmp_path / "results.md").read_text()
