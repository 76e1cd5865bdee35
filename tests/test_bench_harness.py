"""The benchmark harness's timing schedule (no timed assertions: which calls run, in
which order, how many)."""
from __future__ import annotations

from rlkernels.benchmarks import harness
from rlkernels.benchmarks.harness import Impl


def test_implementations_are_timed_interleaved_and_fast_ones_more_often(monkeypatch):
    monkeypatch.setattr(harness, "FAST_BUDGET_S", 1e9)  # a preempted warm-up call must not cut the rounds
    order = []
    impls = [Impl("ours", lambda: order.append("ours")),
             Impl("base", lambda: order.append("base"), baseline=True, setup=lambda: order.append("setup"))]
    times = harness.time_interleaved(impls, "cpu", warmup=2, repeats=5)
    rounds = harness.FAST_SAMPLES  # fast calls: the most rounds
    assert [len(t) for t in times] == [rounds, rounds]
    assert all(t >= 0 for t in times[0] + times[1])
    # warm-up rounds, then timed rounds, each one call of every implementation (setup untimed, first)
    assert order == ["ours", "setup", "base"] * (2 + rounds)


def test_slow_cases_keep_their_repeats(monkeypatch):
    monkeypatch.setattr(harness, "FAST_BUDGET_S", 0.0)  # as if a round took longer than the budget
    times = harness.time_interleaved([Impl("ours", lambda: None)], "cpu", warmup=1, repeats=3)
    assert [len(t) for t in times] == [3]
