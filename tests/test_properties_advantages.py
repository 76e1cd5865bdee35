"""Property-based checks (hypothesis) of the advantage ops and masked reductions: for
any shape (0- and 1-size dims included), mask, dones, gamma and lam, group layout,
dtype and NaN/inf in masked slots, every backend equals the float64 reference, and
repeated calls are bitwise identical.  Budgets: see tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from property_support import (  # noqa: E402
    LOSS_FLOATS, backends, bitwise_equal, budget, close, computed_in, counted, fill, generator, interpreted,
    poison_where, raises_naming, random_mask, seeds,
)


@st.composite
def rollouts(draw, tiny: bool):
    B = draw(st.integers(0, 3 if tiny else 9))
    T = draw(st.integers(0, 6 if tiny else 70))
    g = generator(draw(seeds))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    dtype = draw(st.sampled_from(LOSS_FLOATS))
    rewards = (torch.randn(B, T, generator=g, dtype=torch.float64) * scale).to(dtype)
    values = (torch.randn(B, T, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = torch.rand(B, T, generator=g) > draw(st.floats(0.0, 1.0))
    dones = (torch.rand(B, T, generator=g) > 0.8) if draw(st.booleans()) else None
    last = torch.randn(B, generator=g, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None
    poison = draw(st.sampled_from([None, float("nan"), float("inf")]))
    rewards, values = poison_where(rewards, mask, poison), poison_where(values, mask, poison)
    return rewards, values, mask, dones, last, draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 1.0))


@backends
def test_gae_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(rollouts(interpreted(backend_device)))
    @counted
    def check(case):
        rewards, values, mask, dones, last, gamma, lam = case
        to = (lambda t: None if t is None else t.to(device))
        kw = dict(gamma=gamma, lam=lam)
        adv, ret = rlkernels.gae(to(rewards), to(values), to(mask), dones=to(dones), last_values=to(last),
                                 backend=backend, **kw)
        as64 = (lambda t: None if t is None else t.double())
        exp_adv, exp_ret = reference.gae(rewards.double(), values.double(), mask, dones=dones, last_values=as64(last),
                                         **kw)
        acc = computed_in(rewards.dtype)
        close(adv, exp_adv, computed_in=acc, what="advantages", elementwise=False)
        close(ret[mask], exp_ret[mask], computed_in=acc, what="returns", elementwise=False)
        again = rlkernels.gae(to(rewards), to(values), to(mask), dones=to(dones), last_values=to(last),
                              backend=backend, **kw)
        assert bitwise_equal(adv, again[0]) and bitwise_equal(ret, again[1])
        returns = rlkernels.discounted_returns(to(rewards), to(mask), dones=to(dones), gamma=gamma, backend=backend)
        close(returns, reference.discounted_returns(rewards.double(), mask, dones=dones, gamma=gamma),
              computed_in=acc, what="discounted returns", elementwise=False)

    check()


@backends
def test_group_advantages_property(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device)
    @given(st.integers(0, 3 if tiny else 6), st.integers(1, 4 if tiny else 12), st.sampled_from(["mean", "loo"]),
           st.sampled_from(["group", "batch", "none"]), seeds, st.booleans(), st.booleans(),
           st.sampled_from(LOSS_FLOATS))
    @counted
    def check(groups, size, baseline, scale, seed, ties, by_index, dtype):
        g = generator(seed)
        scores = torch.randn(groups * size, generator=g, dtype=torch.float64)
        if ties:
            scores = scores.round()
        scores = scores.to(dtype)
        kw = dict(baseline=baseline, scale=scale)
        if by_index:  # variable group sizes, in any order
            index = torch.randint(0, max(groups, 1), (groups * size,), generator=g)
            adv, equal = rlkernels.group_advantages(scores.to(device), group_index=index.to(device),
                                                    num_groups=groups, backend=backend, **kw)
            exp, exp_equal = reference.group_advantages(scores.double(), group_index=index, num_groups=groups, **kw)
        else:
            adv, equal = rlkernels.group_advantages(scores.to(device), size, backend=backend, **kw)
            exp, exp_equal = reference.group_advantages(scores.double(), size, **kw)
        close(adv, exp, computed_in=computed_in(dtype), what="advantages")
        assert torch.equal(equal.cpu(), exp_equal)

    check()


@backends
def test_masked_mean_and_whiten_property(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device)
    @given(st.lists(st.integers(0, 3 if tiny else 7), max_size=3), st.sampled_from(LOSS_FLOATS),
           st.sampled_from(["normal", "wide", "huge", "tiny"]), st.floats(0.0, 1.0), st.booleans(),
           st.sampled_from([None, math.nan, math.inf]), st.one_of(st.none(), st.integers(-3, 2)), st.booleans(),
           st.booleans(), seeds)
    @counted
    def check(shape, dtype, regime, density, with_mask, poison, dim, keepdim, shift_mean, seed):
        g = generator(seed)
        x = fill(shape, g, regime, dtype)
        mask = random_mask(shape, g, density) if with_mask else None
        if mask is not None:
            x = poison_where(x, mask, poison)
        if dim is not None and not -max(len(shape), 1) <= dim < max(len(shape), 1):
            raises_naming(lambda: rlkernels.masked_mean(x.to(device), dim=dim, backend=backend), "dim")
            return
        to = (lambda t: None if t is None else t.to(device))
        acc = computed_in(dtype)
        xr = x.double().requires_grad_()
        expected = reference.masked_mean(xr, mask, dim, keepdim)
        xk = to(x).requires_grad_()
        mean = rlkernels.masked_mean(xk, to(mask), dim, keepdim=keepdim, backend=backend)
        assert mean.dtype == acc and mean.shape == expected.shape
        close(mean, expected, computed_in=acc, what="masked_mean", elementwise=False)
        if mean.numel():
            weights = torch.randn(mean.shape, generator=g, dtype=torch.float64)
            (grad,) = torch.autograd.grad((mean * weights.to(device, acc)).sum(), xk)
            (exp_grad,) = torch.autograd.grad((expected * weights).sum(), xr)
            assert grad.dtype == dtype
            if dtype in (torch.float32, torch.float64):
                close(grad, exp_grad, computed_in=dtype, what="masked_mean grad", elementwise=False)
        white = rlkernels.masked_whiten(to(x), to(mask), shift_mean=shift_mean, backend=backend)
        exp_white = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
        close(white, exp_white, computed_in=acc, what="masked_whiten", elementwise=False)

    check()
