"""All or nothing outside the rounds too: DecentralizedAverager.load_state_dict and
average_parameters check everything they can locally before they change anything
(or talk to a peer).  A one-rank group for the state checks; two ranks for the
parameter that cannot hold a result (each rank refuses before any exchange)."""
from __future__ import annotations

import os

import pytest
import torch

from rlkernels.distributed import DecentralizedAverager, average_parameters
from rlkernels.distributed._launch import run_ranks


def _averager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).double())  # two buckets (two dtypes)
    averager = DecentralizedAverager(model, every=2)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        averager.step()
    return averager


def _good_state(averager):
    state = averager.state_dict()
    state["theta_global"] = [g + 1 for g in state["theta_global"]]
    state["steps"], state["rounds"] = 10, 5
    return state


BAD_STATES = {
    "one_bucket_fewer": (lambda s: s["theta_global"].pop(), ValueError, "holds 1 buckets, this averager has 2"),
    "one_bucket_more": (lambda s: s["theta_global"].append(s["theta_global"][0].clone()), ValueError,
                        "holds 3 buckets"),
    "bucket_too_short": (lambda s: s["theta_global"].__setitem__(1, s["theta_global"][1][:-1].clone()), ValueError,
                         r"theta_global'\]\[1\] is float64\[7\], this averager's bucket is float64\[8\]"),
    "bucket_zero_dim": (lambda s: s["theta_global"].__setitem__(0, torch.tensor(1.0)), ValueError,
                        r"theta_global'\]\[0\] is float32\[\]"),
    "bucket_wrong_dtype": (lambda s: s["theta_global"].__setitem__(0, s["theta_global"][0].double()), ValueError,
                           r"theta_global'\]\[0\] is float64"),
    "bucket_nan": (lambda s: s["theta_global"][1].__setitem__(0, float("nan")), ValueError, "NaN or infinite"),
    "bucket_not_tensor": (lambda s: s["theta_global"].__setitem__(0, [1.0] * 15), TypeError, "must be a tensor"),
    "steps_negative": (lambda s: s.__setitem__("steps", -5), ValueError, r"state\['steps'\] must be an integer >= 0"),
    "steps_fraction": (lambda s: s.__setitem__("steps", 2.5), ValueError, r"state\['steps'\]"),
    "steps_bool": (lambda s: s.__setitem__("steps", True), ValueError, r"state\['steps'\]"),
    "rounds_string": (lambda s: s.__setitem__("rounds", "3"), ValueError, r"state\['rounds'\]"),
    "rounds_missing": (lambda s: s.pop("rounds"), ValueError, "missing rounds"),
    "theta_not_list": (lambda s: s.__setitem__("theta_global", torch.zeros(3)), TypeError, "list of tensors"),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_load_state_dict_is_all_or_nothing(one_rank_group, name):
    averager = _averager()
    before = averager.state_dict()
    state = _good_state(averager)
    damage, error, match = BAD_STATES[name]
    damage(state)
    with pytest.raises(error, match=match):
        averager.load_state_dict(state)
    after = averager.state_dict()
    assert (after["steps"], after["rounds"]) == (before["steps"], before["rounds"]) == (4, 2)
    for a, b in zip(after["theta_global"], before["theta_global"]):
        assert torch.equal(a, b)


def test_load_state_dict_takes_a_good_state(one_rank_group):
    averager = _averager()
    state = _good_state(averager)
    averager.load_state_dict(state)
    after = averager.state_dict()
    assert (after["steps"], after["rounds"]) == (10, 5)
    for a, b in zip(after["theta_global"], state["theta_global"]):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="state must be a dict"):
        averager.load_state_dict([1, 2])


def _overlapping_params():
    """Three parameters; the second is expand()ed (stride 0), so it cannot hold a mean."""
    return [torch.randn(5), torch.randn(3, 1).expand(3, 4), torch.randn(2, 2)]


def test_overlapping_parameter_is_refused_before_anything_changes(one_rank_group):
    params = _overlapping_params()
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \[3, 4\], stride \[1, 0\]\) has elements that share"):
        average_parameters(params)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    module = torch.nn.Linear(2, 2)
    module.bias = torch.nn.Parameter(torch.zeros(1).expand(2))
    with pytest.raises(ValueError, match=r"params\[1\].*share"):
        DecentralizedAverager(module)


def _overlap_rank(rank, world):
    params = [torch.full((5,), float(rank)), torch.full((3, 1), float(rank)).expand(3, 4), torch.full((2,), float(rank))]
    try:
        average_parameters(params, timeout=60)
    except ValueError as exc:
        untouched = all(bool((p == rank).all()) for p in params)
        return {"error": str(exc), "untouched": untouched}
    return {"error": None}


def test_overlapping_parameter_on_two_ranks():
    """Both ranks refuse locally, before the signature check: nothing is exchanged,
    nobody waits, and no parameter is written (formerly the other parameters were
    averaged before the expanded one raised)."""
    results = run_ranks(_overlap_rank, 2, timeout_s=120, pg_timeout_s=60)
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        assert r.value["error"] and "share memory" in r.value["error"] and r.value["untouched"]


def test_check_false_is_documented():
    """docs/distributed.md says what check=False gives up (a mismatch then aborts the
    process under gloo, or worse), since no local check can see the other ranks."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "distributed.md"), encoding="utf-8") as fh:
        text = fh.read()
    section = text[text.index("check=False"):]
    assert "abort" in section[:3000] and "before any communication" in text
