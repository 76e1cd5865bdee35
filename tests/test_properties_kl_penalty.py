"""Property-based checks (hypothesis) of kl_penalty: every estimator and clamp, any
shape and dtype, against the float64 reference (values and gradients); inputs outside
the contract raise ValueError/TypeError naming the argument.  Budgets: see
tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from property_support import (  # noqa: E402
    LOSS_FLOATS, REGIMES, backends, budget, close, counted, fill, generator, interpreted, raises_naming,
    rounded_close, seeds, sprinkle,
)


KL_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs", "k1+", "k3+")


@backends
def test_kl_penalty_property(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device)
    @given(st.lists(st.integers(0, 3 if tiny else 9), max_size=3), st.sampled_from(LOSS_FLOATS),
           st.sampled_from(LOSS_FLOATS), st.sampled_from(KL_KINDS),
           st.one_of(st.none(), st.just(math.inf), st.floats(1e-3, 50.0)), st.sampled_from(REGIMES),
           st.sampled_from([0.0, 0.0, 0.2]), seeds)
    @counted
    def check(shape, dtype, ref_dtype, kind, clamp, regime, minus_inf, seed):
        g = generator(seed)
        lp = sprinkle(-fill(shape, g, regime, torch.float64).abs(), g, -math.inf, minus_inf).to(dtype)
        ref = sprinkle(-fill(shape, g, regime, torch.float64).abs(), g, -math.inf, minus_inf).to(ref_dtype)
        lp, ref = lp.to(device), ref.to(device)
        xt, rt = lp.double().requires_grad_(), ref.double().requires_grad_()
        truth = reference.kl_penalty(xt, rt, kind, clamp=clamp)
        x, r = lp.clone().requires_grad_(), ref.clone().requires_grad_()
        value = rlkernels.kl_penalty(x, r, kind, clamp=clamp, backend=backend)
        # k1+ / k3+ carry the value of k1 / k3 (the reference's straight-through trick
        # turns an infinite value into inf - inf = NaN)
        truth_value = reference.kl_penalty(xt, rt, kind.rstrip("+"), clamp=clamp) if kind.endswith("+") else truth
        common = torch.promote_types(dtype, ref_dtype)
        computed_in = torch.float64 if common == torch.float64 else torch.float32
        assert value.dtype == computed_in and value.shape == lp.shape
        close(value, truth_value, computed_in=computed_in, what="value")
        g_out = torch.randn(value.shape, generator=g, dtype=torch.float64).to(device)
        # gradients where both log-probs are finite (at an infinite log-ratio the
        # reference's autograd gives 0 * inf = NaN or a clamp's 0 where the kernel
        # gives the slope's limit)
        finite = torch.isfinite(lp.double()) & torch.isfinite(ref.double())
        weights = torch.where(finite, g_out, 0)
        grads_true = torch.autograd.grad((truth * weights).nansum(), (xt, rt), allow_unused=True)
        grads = torch.autograd.grad((value * weights.to(value.dtype)).nansum(), (x, r), allow_unused=True)
        for ours, truth_grad, d, what in zip(grads, grads_true, (dtype, ref_dtype), ("grad logprobs", "grad ref")):
            if ours is None or truth_grad is None:
                assert ours is None or bool((ours == 0).all()), what
                continue
            assert ours.dtype == d
            ours, truth_grad = torch.where(finite, ours.double(), 0), torch.where(finite, truth_grad, 0)
            if d in (torch.float32, torch.float64):  # written in the input's dtype
                close(ours, truth_grad, computed_in=d, what=what)
            else:
                rounded_close(ours, truth_grad, d, what=what)

    check()


KL_PENALTY_BAD = ("kind", "clamp_zero", "clamp_negative", "clamp_nan", "clamp_str", "shape", "int_dtype",
                  "not_tensor", "backend")


@backends
def test_kl_penalty_bad_input(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=20)
    @given(st.sampled_from(KL_PENALTY_BAD), st.integers(1, 5), seeds)
    @counted
    def check(bad, n, seed):
        g = generator(seed)
        lp, ref = fill((n,), g).to(device), fill((n,), g).to(device)
        kw = dict(kind="k3", clamp=None, backend=backend)
        names = bad.split("_")[0]
        if bad == "kind":
            kw["kind"] = "k4"
        elif bad.startswith("clamp"):
            kw["clamp"] = {"clamp_zero": 0.0, "clamp_negative": -1.0, "clamp_nan": math.nan, "clamp_str": "1"}[bad]
        elif bad == "shape":
            ref, names = torch.cat([ref, ref]), "ref_logprobs"
        elif bad == "int_dtype":
            lp, names = lp.to(torch.int64), "logprobs"
        elif bad == "not_tensor":
            ref, names = ref.tolist(), "ref_logprobs"
        elif bad == "backend":
            kw["backend"] = "gpu"
        raises_naming(lambda: rlkernels.kl_penalty(lp, ref, **kw), names)

    check()
