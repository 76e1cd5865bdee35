"""group_advantages, masked_mean and masked_whiten against the reference."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, assert_close, low_precision_bound

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def check(ours, truth, same, dtype, floor=1e-5):
    if dtype == torch.float64:
        assert_close(ours, truth)
    else:
        low_precision_bound(ours, same, truth, floor=floor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("N,group_size", [(1, 1), (8, 4), (12, 3), (300, 6), (7, 7)])
def test_group_advantages_contiguous(backend_device, dtype, baseline, scale, N, group_size):
    backend, device = backend_device
    scores = (torch.randn(N, device=device) * 3).to(dtype)
    scores[: group_size] = scores[0]  # a zero-variance group
    kw = dict(baseline=baseline, scale=scale)
    adv, equal = rlkernels.group_advantages(scores, group_size, backend=backend, **kw)
    truth, truth_equal = reference.group_advantages(scores.double(), group_size, **kw)
    same, _ = reference.group_advantages(scores, group_size, **kw)
    check(adv, truth, same, dtype)
    assert torch.equal(equal.cpu(), truth_equal.cpu())
    assert bool(equal[0])
    assert torch.all(adv[:group_size] == 0)


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_indexed(backend_device, baseline, scale):
    backend, device = backend_device
    N, G = 50, 9
    scores = torch.randn(N, dtype=torch.float64, device=device)
    index = torch.randint(0, G, (N,), device=device)
    index[index == 4] = 5  # an empty group
    index[0] = 7           # group 7 gets at least one member ...
    index[1:][index[1:] == 7] = 8  # ... and only one
    adv, equal = rlkernels.group_advantages(scores, group_index=index, num_groups=G, baseline=baseline,
                                            scale=scale, backend=backend)
    exp, exp_equal = reference.group_advantages(scores, group_index=index, num_groups=G, baseline=baseline,
                                                scale=scale)
    assert_close(adv, exp)
    assert torch.equal(equal.cpu(), exp_equal.cpu())
    assert adv[0] == 0 and bool(equal[4]) and bool(equal[7])


def test_group_advantages_matches_formulas():
    scores = torch.tensor([1.0, 2.0, 4.0, 7.0, 0.0, 0.0], dtype=torch.float64)
    adv, equal = rlkernels.group_advantages(scores, 3, eps=0.0)
    g = scores[:3]
    assert_close(adv[:3], (g - g.mean()) / g.std())
    assert torch.equal(equal, torch.tensor([False, False]))
    loo, _ = rlkernels.group_advantages(scores, 3, baseline="loo", scale="none")
    assert_close(loo[0], torch.tensor(1.0 - (2.0 + 4.0) / 2, dtype=torch.float64))
    dr, _ = rlkernels.group_advantages(scores, 3, scale="none")
    assert_close(dr[:3], g - g.mean())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((5, 7), None), ((5, 7), 1), ((5, 7), 0), ((3, 4, 129), -1), ((1,), None)])
def test_masked_mean(backend_device, dtype, shape, dim):
    backend, device = backend_device
    x = torch.randn(shape, device=device).to(dtype)
    mask = torch.rand(shape, device=device) > 0.4
    if len(shape) > 1:
        mask[0] = False  # an empty slice along the later dims
    x = torch.where(mask, x, torch.full_like(x, float("nan")))
    out = rlkernels.masked_mean(x, mask, dim, backend=backend)
    truth = reference.masked_mean(x.double(), mask, dim)
    same = reference.masked_mean(x, mask, dim)
    assert out.shape == truth.shape
    assert torch.isfinite(out).all()
    check(out, truth, same, dtype)


def test_masked_mean_keepdim_and_gradient(backend_device):
    backend, device = backend_device
    x = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(4, 6, device=device) > 0.3
    mask[2] = False
    out = rlkernels.masked_mean(x, mask, 1, keepdim=True, backend=backend)
    assert out.shape == (4, 1)
    weights = torch.randn(4, 1, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad((reference.masked_mean(x_ref, mask, 1, keepdim=True) * weights).sum(), x_ref)
    assert_close(grad, grad_ref)
    assert torch.all(grad[2] == 0)


def test_masked_mean_gradcheck():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    assert torch.autograd.gradcheck(lambda t: rlkernels.masked_mean(t, mask, 1), (x,))
    assert torch.autograd.gradcheck(lambda t: rlkernels.masked_mean(t, None), (x,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (4, 33), (16, 300)])
def test_masked_whiten(backend_device, dtype, shift_mean, shape):
    backend, device = backend_device
    x = (torch.randn(shape, device=device) * 5 + 3).to(dtype)
    mask = torch.rand(shape, device=device) > 0.3
    x = torch.where(mask, x, torch.full_like(x, float("inf")))
    out = rlkernels.masked_whiten(x, mask, shift_mean=shift_mean, backend=backend)
    truth = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
    same = reference.masked_whiten(x, mask, shift_mean=shift_mean)
    assert torch.isfinite(out).all()
    check(out, truth, same, dtype, floor=1e-4)
    if mask.sum() > 2:
        valid = out[mask].double()
        if shift_mean:
            assert abs(valid.mean().item()) < 1e-4 and abs(valid.std().item() - 1) < 1e-3


def test_opcheck_and_compile():
    scores = torch.randn(12)
    index = torch.randint(0, 3, (12,))
    for args in [(scores, None, 4, 3, 0, 0, 1e-6), (scores.double(), index, 0, 3, 1, 1, 1e-6)]:
        torch.library.opcheck(torch.ops.rlkernels.group_advantages.default, args)
    x = torch.randn(4, 9, requires_grad=True)
    mask = torch.rand(4, 9) > 0.5
    torch.library.opcheck(torch.ops.rlkernels.masked_row_mean.default, (x, mask))
    torch.library.opcheck(torch.ops.rlkernels.masked_whiten.default, (x.detach(), mask, True, 1e-8))
    if TRITON_ON_CPU:
        torch.library.opcheck(torch.ops.rlkernels.group_advantages_triton.default, (scores, None, 4, 3, 0, 0, 1e-6))
        torch.library.opcheck(torch.ops.rlkernels.masked_row_mean_triton.default, (x, mask))
        torch.library.opcheck(torch.ops.rlkernels.masked_whiten_triton.default, (x.detach(), mask, False, 1e-8))

    @torch.compile(fullgraph=True, backend="eager")
    def fn(s, v, m):
        adv, _ = rlkernels.group_advantages(s, 4)
        return adv.sum() + rlkernels.masked_mean(v, m) + rlkernels.masked_whiten(v, m).sum()

    out = fn(scores, x, mask)
    expected = (reference.group_advantages(scores, 4)[0].sum() + reference.masked_mean(x, mask)
                + reference.masked_whiten(x, mask).sum())
    assert_close(out, expected, dtype=torch.float32)
    out.backward()
    assert x.grad is not None


@pytest.mark.parametrize("call,error,match", [
    (lambda: rlkernels.group_advantages(torch.randn(10), 3), ValueError, "does not divide"),
    (lambda: rlkernels.group_advantages(torch.randn(10), 0), ValueError, "group_size must be >= 1"),
    (lambda: rlkernels.group_advantages(torch.randn(10)), ValueError, "exactly one of group_size or group_index"),
    (lambda: rlkernels.group_advantages(torch.randn(4), group_index=torch.tensor([0, 1, 2, 5]), num_groups=3),
     ValueError, r"group_index values must lie in \[0, 3\)"),
    (lambda: rlkernels.group_advantages(torch.randn(4), group_index=torch.tensor([0, -1, 0, 1])),
     ValueError, "group_index values must lie"),
    (lambda: rlkernels.group_advantages(torch.randn(4), group_index=torch.tensor([0., 1, 0, 1])),
     TypeError, "group_index must have dtype"),
    (lambda: rlkernels.group_advantages(torch.randn(4), 2, baseline="median"), ValueError, "baseline must be one of"),
    (lambda: rlkernels.group_advantages(torch.arange(4), 2), TypeError, "scores must have dtype"),
    (lambda: rlkernels.masked_mean(torch.randn(3), torch.ones(4)), ValueError, "mask must have shape"),
    (lambda: rlkernels.masked_mean(torch.randn(3, 2), None, 2), ValueError, "dim 2 is out of range"),
    (lambda: rlkernels.masked_whiten(torch.randn(3), torch.tensor([0, 2, 1])), ValueError, "mask must hold only 0 and 1"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
