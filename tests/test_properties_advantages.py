"""Property-based checks (hypothesis) of the advantage ops: for any shape
(0- and 1-size dims included), mask, dones, gamma and lam, the compiled
kernels equal the float64 reference, and repeated calls are bitwise identical."""
from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402

SETTINGS = settings(max_examples=int(os.environ.get("RLK_HYPOTHESIS_EXAMPLES", "60")), deadline=None)


@st.composite
def rollouts(draw):
    B = draw(st.integers(0, 9))
    T = draw(st.integers(0, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    values = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(B, T, generator=g) > draw(st.floats(0.0, 1.0))
    dones = (torch.rand(B, T, generator=g) > 0.8) if draw(st.booleans()) else None
    last = torch.randn(B, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    poison = draw(st.sampled_from([None, float("nan"), float("inf")]))
    if poison is not None:
        rewards = torch.where(mask, rewards, torch.full_like(rewards, poison))
        values = torch.where(mask, values, torch.full_like(values, poison))
    gamma = draw(st.floats(0.0, 1.0))
    lam = draw(st.floats(0.0, 1.0))
    return rewards, values, mask, dones, last, gamma, lam


@SETTINGS
@given(rollouts())
def test_gae_property(case):
    rewards, values, mask, dones, last, gamma, lam = case
    adv, ret = rlkernels.gae(rewards, values, mask, dones=dones, last_values=last, gamma=gamma, lam=lam)
    exp_adv, exp_ret = reference.gae(rewards, values, mask, dones=dones, last_values=last, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, exp_adv, rtol=1e-10, atol=1e-10, equal_nan=True)
    torch.testing.assert_close(ret[mask], exp_ret[mask], rtol=1e-10, atol=1e-10, equal_nan=True)
    again = rlkernels.gae(rewards, values, mask, dones=dones, last_values=last, gamma=gamma, lam=lam)
    assert torch.equal(adv.nan_to_num(), again[0].nan_to_num())
    returns = rlkernels.discounted_returns(rewards, mask, dones=dones, gamma=gamma)
    torch.testing.assert_close(returns, reference.discounted_returns(rewards, mask, dones=dones, gamma=gamma),
                               rtol=1e-10, atol=1e-10, equal_nan=True)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 12), st.sampled_from(["mean", "loo"]),
       st.sampled_from(["group", "batch", "none"]), st.integers(0, 2**31 - 1), st.booleans())
def test_group_advantages_property(groups, size, baseline, scale, seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(groups * size, generator=g, dtype=torch.float64)
    if ties:
        scores = scores.round()
    adv, equal = rlkernels.group_advantages(scores, size, baseline=baseline, scale=scale)
    exp, exp_equal = reference.group_advantages(scores, size, baseline=baseline, scale=scale)
    torch.testing.assert_close(adv, exp, rtol=1e-9, atol=1e-9)
    assert torch.equal(equal, exp_equal)
