"""Property-based checks (hypothesis) of kl_from_logits.  For any shape, memory layout,
dtype, temperature, masked rows holding NaN/inf and values from the extremes, every
backend equals the float64 reference (values and gradients) within the tolerance
table.  Budgets: see tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from property_support import (  # noqa: E402
    backends, budget, check_logits_grad, close, counted, fill, interpreted, logits_cases, poison_where,
)


# Below this temperature the float32 KL gradient p_j (d_j - E_p d) / T (docs/numerics.md)
# loses relative accuracy ~eps |logit gaps| / T: values are checked at any temperature,
# gradients from here up.
KL_GRAD_MIN_TEMPERATURE = 0.25


@backends
def test_kl_from_logits_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(logits_cases(interpreted(backend_device)), st.sampled_from(["none", "both", "policy", "ref"]),
           st.booleans(), st.booleans())
    @counted
    def check(case, minus_inf, masked, ref_grad):
        logits, _, kw, g = case
        logits = logits.detach().double().nan_to_num(0.0, 0.0, 0.0).to(logits.dtype)
        ref = (logits.double() + fill(logits.shape, g, "normal", torch.float64)).to(logits.dtype)
        # -inf where both have it (p = q = 0), in the policy only (p = 0), or in the
        # reference only (q = 0 < p: KL = inf, as it should be)
        hole = torch.rand(logits.shape, generator=g) < 0.3
        if minus_inf in ("both", "policy"):
            logits = torch.where(hole, -math.inf, logits.double()).to(logits.dtype)
        if minus_inf in ("both", "ref"):
            ref = torch.where(hole, -math.inf, ref.double()).to(ref.dtype)
        mask = torch.rand(logits.shape[:-1], generator=g) < 0.7 if masked else None
        if mask is not None:
            keep = mask.unsqueeze(-1)
            logits = poison_where(logits, keep, math.nan)
            ref = poison_where(ref, keep, math.inf)
        logits, ref = logits.to(device), ref.to(device)
        mask = mask.to(device) if mask is not None else None
        g_kl = torch.randn(logits.shape[:-1], generator=g).to(device)
        xt = logits.double().requires_grad_()
        rt = ref.double().requires_grad_()
        kl_true = reference.kl_from_logits(xt, rt, temperature=kw["temperature"], mask=mask)
        x = logits.clone().requires_grad_()
        r = ref.clone().requires_grad_(ref_grad)
        kl = rlkernels.kl_from_logits(x, r, temperature=kw["temperature"], mask=mask, backend=backend)
        assert kl.dtype == torch.float32 and kl.shape == logits.shape[:-1]
        # where float64 keeps a p_j that float32 flushes to 0 next to q_j = 0, the truth
        # is inf and float32 arithmetic (PyTorch's too) gives a finite KL
        kl_same = reference.kl_from_logits(logits.float(), ref.float(), temperature=kw["temperature"], mask=mask)
        close(kl, kl_true, what="kl", same_dtype=kl_same)
        if mask is not None:
            assert bool((kl[~mask] == 0).all())
        finite_rows = torch.isfinite(kl_true.detach())
        if kl.numel() == 0 or kw["temperature"] < KL_GRAD_MIN_TEMPERATURE:
            return
        # gradients where KL is finite (an infinite KL has no meaningful gradient)
        weights = torch.where(finite_rows, g_kl, 0)
        grads_true = torch.autograd.grad((kl_true * weights.double()).nansum(), (xt, rt))
        grads = torch.autograd.grad((kl * weights).nansum(), (x, r) if ref_grad else (x,))
        rows = finite_rows.unsqueeze(-1).expand(logits.shape)
        for ours, truth, what in zip(grads, grads_true, ("grad logits", "grad ref_logits")):
            assert ours.dtype == logits.dtype
            ours, truth = torch.where(rows, ours.double(), 0), torch.where(rows, truth, 0)
            check_logits_grad(ours, truth, logits.dtype, what)

    check()


# ---- regressions found by the property above --------------------------------------------------

@backends
@pytest.mark.parametrize("temperature", [1.0, 0.01, 0.001])
def test_regression_kl_is_shift_invariant(backend_device, temperature):
    """KL(softmax(a / T) || softmax((a + c) / T)) = 0 for any offset c.  The log-ratio
    sum used to be kept uncentred, so (c / T) rounded and left ~1e-7 c / T in KL and
    1e-7 c / T^2 in the gradient (1.3e-5 and 0.013 for V = 1, T = 1e-3)."""
    backend, device = backend_device
    V = 17 if interpreted(backend_device) else 3000
    for rows, offset in ((torch.randn(1, 1), 0.25), (torch.randn(4, V) * 3, 40.0), (torch.randn(4, V), -1e3)):
        rows = (rows * 1024).round() / 1024  # a grid on which a + offset is exact in float32
        logits = rows.to(device).requires_grad_()
        ref = (rows + offset).to(device)
        assert torch.equal(ref.double() - rows.double(), torch.full_like(rows.double(), offset).to(device))
        kl = rlkernels.kl_from_logits(logits, ref, temperature=temperature, backend=backend)
        truth = reference.kl_from_logits(rows.double(), ref.double().cpu(), temperature=temperature)
        (grad,) = torch.autograd.grad(kl.sum(), logits)
        xt = rows.double().requires_grad_()
        (grad_true,) = torch.autograd.grad(reference.kl_from_logits(xt, ref.double().cpu(), temperature=temperature)
                                           .sum(), xt)
        close(kl, truth, what="kl")
        close(grad, grad_true, what="grad", elementwise=False)
        assert float(kl.abs().max()) < 1e-6


@backends
@pytest.mark.parametrize("gap", [10.0, 70.0, 1e4])
def test_regression_kl_is_inf_where_the_reference_rules_a_token_out(backend_device, gap):
    """q_j = 0 (ref logit -inf) next to a finite policy logit makes KL inf, however small
    p_j: the kernels flush p_j below 2^-125 to 0 and used to return a finite KL."""
    backend, device = backend_device
    logits = torch.tensor([[gap, 0.0, -gap], [0.0, 1.0, 2.0]], device=device)
    ref = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 1.0, 2.0]], device=device)
    for temperature in (1.0, 0.5):
        kl = rlkernels.kl_from_logits(logits, ref, temperature=temperature, backend=backend)
        truth = reference.kl_from_logits(logits.double(), ref.double(), temperature=temperature)
        assert float(kl[0]) == math.inf and float(truth[0]) == math.inf
        close(kl[1:], truth[1:], what="kl")
    # the policy ruling the token out too (both -inf) is fine
    both = torch.tensor([[1.0, 0.0, -math.inf]], device=device)
    assert math.isfinite(float(rlkernels.kl_from_logits(both, both, backend=backend)[0]))
