"""kl_penalty: every backend against the float64 reference and the documented
formulas, values and gradients, low precision and NaN, opcheck, torch.compile and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, assert_close

KINDS = ["k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs", "k1+", "k3+"]


def penalty_inputs(n=257, dtype=torch.float32, device="cpu"):
    lp = torch.randn(n, dtype=torch.float64, device=device) * 3 - 2
    ref = lp + torch.randn(n, dtype=torch.float64, device=device)
    # the clamps' edges: |r| beyond 20, exactly 0, values beyond 10
    lp[:6] = torch.tensor([0.0, 25.0, -25.0, 1.0, -12.0, 14.0], device=device)
    ref[:6] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0], device=device)
    return lp.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("clamp", [None, 0.5, math.inf])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty_matches_reference(backend_device, kind, clamp, dtype):
    backend, device = backend_device
    lp, ref = penalty_inputs(dtype=dtype, device=device)
    x, y = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    value = rlkernels.kl_penalty(x, y, kind, clamp=clamp, backend=backend)
    assert value.dtype == dtype
    g = torch.randn(value.shape, dtype=dtype, device=device)
    (value * g).sum().backward()
    xr, yr = lp.double().requires_grad_(), ref.double().requires_grad_()
    expected = reference.kl_penalty(xr, yr, kind, clamp=clamp)
    (expected * g.double()).sum().backward()
    assert_close(value, expected, dtype=dtype)
    assert_close(x.grad, xr.grad, dtype=dtype)
    assert_close(y.grad, yr.grad, dtype=dtype)


def test_kl_penalty_documented_formulas():
    lp, ref = penalty_inputs(dtype=torch.float64)
    r = lp - ref
    c = (-r).clamp(-20, 20)
    k3 = (c.exp() - c - 1).clamp(-10, 10)
    expected = {"k1": r, "k2": r * r / 2, "abs": r.abs(), "k3": k3, "k1+": r, "k3+": k3}
    slopes = {"k1": torch.ones_like(r), "k2": r, "abs": r.sign(), "k1+": r, "k3+": r,
              "k3": torch.where((r.abs() <= 20) & ((c.exp() - c - 1) <= 10), 1 - c.exp(), 0)}
    for kind, value in expected.items():
        x = lp.clone().requires_grad_()
        out = rlkernels.kl_penalty(x, ref, kind)
        out.sum().backward()
        assert_close(out, value, msg=kind)
        assert_close(x.grad, slopes[kind], msg=kind)


def test_kl_penalty_low_precision_and_nan(backend_device):
    backend, device = backend_device
    lp, ref = penalty_inputs(dtype=torch.bfloat16, device=device)
    out = rlkernels.kl_penalty(lp, ref, "k3", backend=backend)
    assert out.dtype == torch.float32  # 16-bit inputs compute and return float32
    assert_close(out, reference.kl_penalty(lp.double(), ref.double(), "k3"), dtype=torch.float32)
    lp = torch.tensor([float("nan"), 0.0], device=device)
    ref = torch.tensor([0.0, float("nan")], device=device)
    for kind in ("k1", "k2", "k3", "abs"):
        assert torch.isnan(rlkernels.kl_penalty(lp, ref, kind, backend=backend)).all()


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs", "k3+"])
def test_kl_penalty_cpu_chunks_tasks_and_16bit_staging(kind):
    """The CPU kernel's seams: 16-bit inputs staged in 512-element chunks (a tail
    included), and a float32 tensor long enough to be split over two threads;
    every element against the float64 reference, values and gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, dtype in ((1537, torch.float16), (1537, torch.bfloat16), ((1 << 19) + 37, torch.float32)):
            lp, ref = penalty_inputs(n, dtype=dtype)
            x = lp.clone().requires_grad_()
            value = rlkernels.kl_penalty(x, ref, kind, backend="cpu")
            assert value.dtype == torch.float32
            g = torch.randn(n)
            (value * g).sum().backward()
            xr = lp.double().requires_grad_()
            expected = reference.kl_penalty(xr, ref.double(), kind)
            (expected * g.double()).sum().backward()
            assert_close(value, expected, dtype=torch.float32, msg=f"{kind} {dtype} value")
            if dtype == torch.float32:
                assert_close(x.grad, xr.grad, msg=f"{kind} grad")
            else:  # the float32 gradient rounded once to the input's dtype: within 2x that rounding
                torch.testing.assert_close(x.grad.double(), xr.grad, rtol=torch.finfo(dtype).eps, atol=1e-5,
                                           msg=f"{kind} {dtype} grad")
    finally:
        torch.set_num_threads(threads)


def test_kl_penalty_shapes_opcheck_compile():
    lp, ref = penalty_inputs(12)
    lp2, ref2 = lp.view(3, 4), ref.view(3, 4).t().contiguous().t()  # strided reference
    assert_close(rlkernels.kl_penalty(lp2, ref2, "k3"), reference.kl_penalty(lp2, ref2, "k3"))
    empty = rlkernels.kl_penalty(torch.empty(0, 5), torch.empty(0, 5), "k2")
    assert empty.shape == (0, 5)
    ops = [torch.ops.rlkernels.kl_penalty.default]
    if TRITON_ON_CPU:
        ops.append(torch.ops.rlkernels.kl_penalty_triton.default)
    for op in ops:
        for kind, clamp in [("k3", 10.0), ("k1+", math.inf), ("abs", 0.3)]:
            torch.library.opcheck(op, (lp.clone().requires_grad_(), ref.clone().requires_grad_(), kind, clamp))
        torch.library.opcheck(op, (lp.double(), ref.double(), "k2", math.inf))

    @torch.compile(fullgraph=True, backend="eager")
    def step(x, y):
        return rlkernels.kl_penalty(x, y, "low_var_kl").mean()

    x = lp.clone().requires_grad_()
    step(x, ref).backward()
    xr = lp.clone().requires_grad_()
    reference.kl_penalty(xr, ref, "low_var_kl").mean().backward()
    assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kind="full"), ValueError, "kind must be one of"),
    (dict(kind="k4"), ValueError, "kind must be one of"),
    (dict(clamp=0), ValueError, "clamp must be > 0.0"),
    (dict(clamp="10"), TypeError, "clamp must be a number"),
    (dict(ref_logprobs=torch.randn(4, 3)), ValueError, "ref_logprobs must have the shape of logprobs"),
    (dict(ref_logprobs=torch.randn(3, 4, device="meta")), ValueError, "ref_logprobs is on meta but logprobs is on cpu"),
    (dict(logprobs=torch.ones(3, 4, dtype=torch.long)), TypeError, "logprobs must have dtype"),
])
def test_kl_penalty_bad_input(kwargs, error, match):
    args = dict(logprobs=torch.randn(3, 4), ref_logprobs=torch.randn(3, 4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.kl_penalty(args.pop("logprobs"), args.pop("ref_logprobs"), **args)
