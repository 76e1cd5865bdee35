"""Distributed faults on real 3-process gloo groups: a rank killed mid-round, a rank
that stalls past the timeout mid-round, and a rank with different tensors or
settings.  For every entry point (average_parameters, ring_all_reduce,
gossip_average, DecentralizedAverager in its three modes) every other rank must get
an AveragingError naming the function, its rank and the cause within the timeout,
with every tensor the call may write (parameters, optimizer state, theta_global)
bitwise unchanged and the averager's counters unchanged.

"Mid-round" means after the first bucket (or ring step) has completed on every rank:
a round that wrote results bucket by bucket would have changed the first bucket's
tensors by then, which these tests would report.  Rank-side code:
tests/distributed_faults.py."""
from __future__ import annotations

import datetime
import os

import pytest
import torch

import distributed_faults as F
from rlkernels.distributed import AveragingError, AveragingMismatchError, average_parameters, gossip_average
from rlkernels.distributed import DecentralizedAverager, ring_all_reduce
from rlkernels.distributed._launch import run_ranks

SLACK_S = 3.0  # scheduling on a loaded machine, on top of the timeout
DEADLINE_S = 60.0

FIRST_STEP = {"average_parameters": ("bucket", 0), "ring_all_reduce": ("ring step", 0),
              "gossip_average": ("bucket", 0), "averager_allreduce": ("bucket", 0), "averager_ring": ("bucket", 0),
              "averager_gossip": ("bucket", 0)}
FN = {"average_parameters": "average_parameters", "ring_all_reduce": "ring_all_reduce",
      "gossip_average": "gossip_average", "averager_allreduce": "DecentralizedAverager.average",
      "averager_ring": "DecentralizedAverager.average", "averager_gossip": "DecentralizedAverager.average"}


def run_fault(tmp_path, entry, fault, trigger, *, timeout, pg_timeout_s, slow_s=0.0):
    workdir = os.fspath(tmp_path)
    return run_ranks(F.fault_worker, F.WORLD, args=(entry, fault, trigger, workdir, timeout, slow_s),
                     timeout_s=DEADLINE_S, pg_timeout_s=pg_timeout_s)


def check_survivors(results, entry, limit_s, limit_text, mid_round=True):
    for r in results[:-1]:
        assert r.ok, r.error
        report = r.value
        if mid_round:
            assert report["hook_fired"], f"rank {r.rank}: the first bucket never completed: the fault was not mid-round"
        assert report["error"] is not None, f"rank {r.rank}: {entry} returned although rank {F.WORLD - 1} is gone"
        assert "AveragingError" in report["type"] and "RuntimeError" in report["type"], report["type"]
        message = report["error"]
        for part in (f"rlkernels.distributed.{FN[entry]}: rank {r.rank} of {F.WORLD}", "failed after", limit_text,
                     "unchanged"):
            assert part in message, f"rank {r.rank}: {part!r} not in: {message}"
        assert report["attrs"]["fn"] == FN[entry] and report["attrs"]["rank"] == r.rank, report["attrs"]
        assert report["changed"] is None, f"rank {r.rank}: {report['changed']} ({message})"
        assert report["counters_kept"], f"rank {r.rank}: the averager's step counters moved"
        assert report["seconds"] < limit_s + SLACK_S, f"rank {r.rank}: took {report['seconds']:.1f} s: {message}"


@pytest.mark.parametrize("entry,trigger", [(e, FIRST_STEP[e]) for e in F.ENTRIES] + [
    ("averager_allreduce", ("parameters", 0))], ids=list(F.ENTRIES) + ["averager_between_params_and_state"])
def test_rank_killed_mid_round(tmp_path, entry, trigger):
    """The last rank exits once every rank has finished the first bucket (or, last
    case, the averager's parameter phase, before its optimizer-state phase)."""
    pg_timeout_s = 5.0
    results = run_fault(tmp_path, entry, "exit", trigger, timeout=None, pg_timeout_s=pg_timeout_s)
    assert not results[-1].ok and "exited with code 3" in results[-1].error, results[-1].error
    check_survivors(results, entry, pg_timeout_s, "timeout: the process group's")


@pytest.mark.parametrize("entry", F.ENTRIES)
def test_rank_killed_before_the_call(tmp_path, entry):
    """The others fail in the check that precedes any data movement."""
    results = run_fault(tmp_path, entry, "exit", None, timeout=None, pg_timeout_s=5.0)
    assert not results[-1].ok and "exited with code 3" in results[-1].error, results[-1].error
    check_survivors(results, entry, 5.0, "the check that every rank passes the same tensors", mid_round=False)


def test_rank_absent_from_the_call(tmp_path):
    """A rank that never arrives: the check's all_gather gives up after timeout=2 s."""
    results = run_fault(tmp_path, "average_parameters", "slow", None, timeout=2.0, pg_timeout_s=30.0, slow_s=4.0)
    check_survivors(results, "average_parameters", 2.0, "the check that every rank passes the same tensors",
                    mid_round=False)


@pytest.mark.parametrize("entry", F.ENTRIES)
def test_slow_rank_past_the_timeout_argument(tmp_path, entry):
    """The last rank stalls 4 s after the first bucket; the others give up after
    timeout=2 s although the process group would wait 30 s.  The slow rank itself
    ends all or nothing: an error with its tensors unchanged, or the full result."""
    timeout = 2.0
    results = run_fault(tmp_path, entry, "slow", FIRST_STEP[entry], timeout=timeout, pg_timeout_s=30.0, slow_s=4.0)
    check_survivors(results, entry, timeout, "timeout=2 s")
    for r in results[:-1]:
        assert r.value["seconds"] >= 0.9 * timeout, f"rank {r.rank} gave up early: {r.value['error']}"
    slow = results[-1]
    assert slow.ok, slow.error
    if slow.value["error"] is not None:
        assert slow.value["changed"] is None, f"slow rank: {slow.value['changed']} ({slow.value['error']})"
    else:
        assert slow.value["complete"], "slow rank returned with a partial result"


@pytest.mark.parametrize("entry", ["average_parameters", "ring_all_reduce"])
def test_slow_rank_past_the_process_group_timeout(tmp_path, entry):
    """No timeout argument: the process group's 2 s timeout applies, to the
    all_reduce (gloo's own timeout) and to the ring's point-to-point waits alike."""
    timedelta = datetime.timedelta(seconds=2)
    results = run_fault(tmp_path, entry, "slow", FIRST_STEP[entry], timeout=None, pg_timeout_s=timedelta.seconds,
                        slow_s=4.0)
    check_survivors(results, entry, timedelta.seconds, "timeout: the process group's")


def test_mismatched_rank_fails_everywhere_before_data_moves():
    results = run_ranks(F.mismatch_worker, F.WORLD, timeout_s=DEADLINE_S, pg_timeout_s=10.0)
    for r in results:
        assert r.ok, r.error
        assert not r.value["problems"], f"rank {r.rank}:\n" + "\n".join(r.value["problems"])
        slowest = max(r.value["seconds"].items(), key=lambda kv: kv[1])
        assert slowest[1] < 5.0, f"rank {r.rank}: {slowest[0]} took {slowest[1]:.1f} s to report the mismatch"


# ---- single process ------------------------------------------------------------------------------

def test_error_classes():
    assert issubclass(AveragingError, RuntimeError)
    assert issubclass(AveragingMismatchError, AveragingError) and issubclass(AveragingMismatchError, ValueError)


@pytest.mark.parametrize("call,error,match", [
    (lambda: average_parameters([torch.ones(3)], timeout=0), ValueError, "timeout must be > 0.0"),
    (lambda: ring_all_reduce(torch.ones(3), timeout=-1.0), ValueError, "timeout must be > 0.0"),
    (lambda: gossip_average(torch.ones(3), timeout="5"), TypeError, "timeout must be a number"),
    (lambda: DecentralizedAverager(torch.nn.Linear(2, 2), timeout=datetime.timedelta(0)), ValueError,
     "timeout must be > 0"),
])
def test_bad_timeout(call, error, match):
    with pytest.raises(error, match=match):
        call()
