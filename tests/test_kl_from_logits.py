"""kl_from_logits: every backend against the float64 reference, values and
gradients, adversarial inputs, opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, assert_close, low_precision_bound

LOW = [torch.bfloat16, torch.float16]


def pair(rows, V, dtype=torch.float32, device="cpu", scale=2.0):
    a = torch.randn(rows, V, device=device) * scale
    b = a + torch.randn(rows, V, device=device) * scale / 2  # a nearby reference policy
    return a.to(dtype), b.to(dtype)


def torch_same_dtype_kl(a, b, temperature=1.0):
    logp = torch.log_softmax(a / temperature, -1)
    logq = torch.log_softmax(b / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


# ---- kl_from_logits ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_kl_from_logits_values(backend_device, dtype, temperature):
    backend, device = backend_device
    shapes = [(1, 1), (4, 2), (5, 127), (3, 1000)] + ([(2, 50257), (2, 151936)] if backend == "cpu" else [])
    for rows, V in shapes:
        a, b = pair(rows, V, dtype, device)
        kl = rlkernels.kl_from_logits(a, b, temperature=temperature, backend=backend)
        assert kl.dtype == torch.float32 and kl.shape == (rows,)
        truth = reference.kl_from_logits(a.double(), b.double(), temperature=temperature)
        if dtype == torch.float32:
            assert_close(kl, truth, msg=f"V={V}")
        else:
            low_precision_bound(kl, torch_same_dtype_kl(a, b, temperature), truth)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_kl_from_logits_gradients(backend_device, dtype):
    backend, device = backend_device
    shapes = [(5, 127), (3, 1000)] + ([(2, 50257)] if backend == "cpu" else [])
    for rows, V in shapes:
        a, b = pair(rows, V, dtype, device)
        mask = torch.ones(rows, dtype=torch.bool, device=device)
        mask[1] = False
        g = torch.randn(rows, device=device)
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        (rlkernels.kl_from_logits(x, y, temperature=0.8, mask=mask, backend=backend) * g).sum().backward()
        xr, yr = a.double().requires_grad_(), b.double().requires_grad_()
        (reference.kl_from_logits(xr, yr, temperature=0.8, mask=mask) * g).sum().backward()
        # closed forms: p (log p - log q - KL) / T and (q - p) / T
        logp, logq = torch.log_softmax(a.double() / 0.8, -1), torch.log_softmax(b.double() / 0.8, -1)
        p, q = logp.exp(), logq.exp()
        kl = (p * (logp - logq)).sum(-1, keepdim=True)
        scale = (g.double() * mask)[:, None] / 0.8
        assert_close(xr.grad, scale * p * (logp - logq - kl), dtype=torch.float64)
        assert_close(yr.grad, scale * (q - p), dtype=torch.float64)
        assert x.grad.dtype == dtype and y.grad.dtype == dtype
        if dtype == torch.float32:
            assert_close(x.grad, xr.grad)
            assert_close(y.grad, yr.grad)
        else:
            xs, ys = a.clone().requires_grad_(), b.clone().requires_grad_()
            (torch_same_dtype_kl(xs, ys, 0.8) * g * mask).sum().backward()
            low_precision_bound(x.grad, xs.grad, xr.grad)
            low_precision_bound(y.grad, ys.grad, yr.grad)


def test_kl_from_logits_only_logits_grad(backend_device):
    backend, device = backend_device
    a, b = pair(3, 200, device=device)
    x = a.clone().requires_grad_()
    rlkernels.kl_from_logits(x, b, backend=backend).sum().backward()
    xr = a.double().requires_grad_()
    reference.kl_from_logits(xr, b.double()).sum().backward()
    assert_close(x.grad, xr.grad)


def test_kl_from_logits_extremes(backend_device):
    backend, device = backend_device
    V = 300
    a, b = pair(6, V, device=device)
    a[0] = torch.randn(V, device=device) * 1e4
    b[0] = a[0] + torch.randn(V, device=device)
    b[1] = a[1]  # identical rows: KL 0
    a[2, : V // 2] = float("-inf")  # p = 0 there: no contribution, even where q = 0 too
    b[2, : V // 3] = float("-inf")
    b[3, 5] = float("-inf")  # q = 0 where p > 0: KL = inf
    a[4] = float("-inf")
    a[4, 7] = 3.0  # one-hot policy: KL = -log q_7
    a[5, 9] = a[5].max() - 500  # p_9 > 0 underflows to 0 (also in float64) ...
    b[5, 9] = float("-inf")  # ... and q_9 = 0: KL = inf all the same
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    kl = rlkernels.kl_from_logits(x, y, backend=backend)
    truth = reference.kl_from_logits(a.double(), b.double())
    assert kl[3] == float("inf") and truth[3] == float("inf")
    assert kl[5] == float("inf") and truth[5] == float("inf")
    rows = [0, 1, 2, 4]
    assert_close(kl[rows], truth[rows])
    assert abs(kl[1].item()) < 1e-6
    kl[rows].sum().backward()
    xr, yr = a.double().requires_grad_(), b.double().requires_grad_()
    reference.kl_from_logits(xr, yr)[rows].sum().backward()
    assert torch.isfinite(x.grad[rows]).all()
    assert_close(x.grad[rows], xr.grad[rows])
    assert_close(y.grad[rows], yr.grad[rows])


def test_kl_from_logits_mask_and_strides(backend_device):
    backend, device = backend_device
    B, T, V = 2, 5, 67
    full_a = torch.randn(B, T + 1, V, device=device)
    full_b = torch.randn(V, B, T + 1, device=device).permute(1, 2, 0)  # vocabulary not contiguous: copied
    a, b = full_a[:, :-1], full_b[:, :-1]
    mask = torch.rand(B, T, device=device) > 0.4
    a_poisoned = torch.where(mask[..., None], a, float("nan"))
    x = a_poisoned.clone().requires_grad_()
    kl = rlkernels.kl_from_logits(x, b, mask=mask.int(), backend=backend)
    truth = reference.kl_from_logits(a.double(), b.double(), mask=mask)
    assert_close(kl, truth)
    assert torch.equal(kl[~mask], torch.zeros(int((~mask).sum()), device=device))
    kl.sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    xr = a.double().requires_grad_()
    reference.kl_from_logits(xr, b.double(), mask=mask).sum().backward()
    assert_close(x.grad, xr.grad)


def test_kl_from_logits_opcheck_and_compile():
    a, b = pair(4, 33)
    mask = torch.tensor([True, False, True, True])
    samples = [(a, b, None, 1.0), (a.bfloat16(), b.bfloat16(), mask, 0.7),
               (torch.randn(2, 4, 33)[:, 1:], torch.randn(2, 3, 33), None, 1.0)]
    ops = [torch.ops.rlkernels.kl_from_logits.default]
    if TRITON_ON_CPU:
        ops.append(torch.ops.rlkernels.kl_from_logits_triton.default)
    for op in ops:
        for x, y, m, t in samples:
            torch.library.opcheck(op, (x.clone().requires_grad_(), y.clone().requires_grad_(), m, t))
    kl, saved = torch.ops.rlkernels.kl_from_logits(a, b, mask, 1.0)
    back = [torch.ops.rlkernels.kl_from_logits_backward.default]
    if TRITON_ON_CPU:
        back.append(torch.ops.rlkernels.kl_from_logits_backward_triton.default)
    for op in back:
        torch.library.opcheck(op, (torch.randn(4), a, b, mask, saved, 1.0, True, True))
        torch.library.opcheck(op, (torch.randn(4), a, b, None, saved, 1.0, True, False))

    hidden = torch.randn(4, 6, requires_grad=True)
    proj = torch.randn(6, 33)

    @torch.compile(fullgraph=True, backend="eager")
    def step(h):
        return rlkernels.kl_from_logits(h @ proj, b, temperature=0.9, mask=mask).sum()

    step(hidden).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    reference.kl_from_logits(hidden @ proj, b, temperature=0.9, mask=mask).sum().backward()
    assert_close(grad, hidden.grad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ref_logits=torch.randn(3, 6)), ValueError, "ref_logits must have the shape of logits"),
    (dict(ref_logits=torch.randn(3, 5, dtype=torch.float64)), TypeError, "ref_logits must have the dtype of logits"),
    (dict(ref_logits=torch.randn(3, 5, device="meta")), ValueError, "ref_logits is on meta but logits is on cpu"),
    (dict(logits=torch.ones(3, 5, dtype=torch.int32)), TypeError, "logits must have dtype"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=torch.full((3,), 2)), ValueError, "mask must hold only 0 and 1"),
    (dict(temperature=0), ValueError, "temperature must be > 0.0"),
    (dict(backend="triton-gpu"), ValueError, "backend must be one of"),
])
def test_kl_from_logits_bad_input(kwargs, error, match):
    args = dict(logits=torch.randn(3, 5), ref_logits=torch.randn(3, 5))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.kl_from_logits(args.pop("logits"), args.pop("ref_logits"), **args)
