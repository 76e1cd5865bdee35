"""masked_mean and masked_whiten against the reference: values, gradients, opcheck,
torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, assert_close, matches_truth

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


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
    matches_truth(out, truth, same, dtype)


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
    matches_truth(out, truth, same, dtype, floor=1e-4)
    if mask.sum() > 2:
        valid = out[mask].double()
        if shift_mean:
            assert abs(valid.mean().item()) < 1e-4 and abs(valid.std().item() - 1) < 1e-3


def test_opcheck_and_compile():
    x = torch.randn(4, 9, requires_grad=True)
    mask = torch.rand(4, 9) > 0.5
    torch.library.opcheck(torch.ops.rlkernels.masked_row_mean.default, (x, mask))
    torch.library.opcheck(torch.ops.rlkernels.masked_whiten.default, (x.detach(), mask, True, 1e-8))
    if TRITON_ON_CPU:
        torch.library.opcheck(torch.ops.rlkernels.masked_row_mean_triton.default, (x, mask))
        torch.library.opcheck(torch.ops.rlkernels.masked_whiten_triton.default, (x.detach(), mask, False, 1e-8))

    @torch.compile(fullgraph=True, backend="eager")
    def fn(v, m):
        return rlkernels.masked_mean(v, m) + rlkernels.masked_whiten(v, m).sum()

    out = fn(x, mask)
    expected = reference.masked_mean(x, mask) + reference.masked_whiten(x, mask).sum()
    assert_close(out, expected, dtype=torch.float32)
    out.backward()
    assert x.grad is not None


@pytest.mark.parametrize("call,error,match", [
    (lambda: rlkernels.masked_mean(torch.randn(3), torch.ones(4)), ValueError, "mask must have shape"),
    (lambda: rlkernels.masked_mean(torch.randn(3, 2), None, 2), ValueError, "dim 2 is out of range"),
    (lambda: rlkernels.masked_whiten(torch.randn(3), torch.tensor([0, 2, 1])), ValueError, "mask must hold only 0 and 1"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not TRITON_ON_CPU and not torch.cuda.is_available(), reason="Triton does not run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_triton_whiten_over_many_slices(monkeypatch, dtype, shift_mean):
    """masked_whiten's Triton passes split the tensor into slices (one program each)
    merged by one program: slices lowered to 64 entries, a partial last slice, a slice
    with no valid entry, poison under the mask, and a large common offset (the merge
    of the slices' squared deviations must not cancel)."""
    from rlkernels.triton import masked as triton_masked
    monkeypatch.setattr(triton_masked, "_SLICE", 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(5, 97, dtype=torch.float64, device=device) * 2 + 1e3).to(dtype)
    mask = torch.rand(5, 97, device=device) > 0.3
    mask[1] = False                      # entries 97..193: slice 2 holds nothing valid
    x = torch.where(mask, x, torch.full_like(x, float("nan")))
    out = rlkernels.masked_whiten(x, mask, shift_mean=shift_mean, backend="triton")
    truth = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
    same = reference.masked_whiten(x, mask, shift_mean=shift_mean)
    assert torch.isfinite(out).all() and torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    matches_truth(out, truth, same, dtype, floor=1e-4)
    one = torch.zeros(200, dtype=torch.bool, device=device)
    one[150] = True                      # a single valid entry: variance 0
    single = rlkernels.masked_whiten(torch.randn(200, device=device), one, backend="triton")
    assert torch.equal(single, torch.zeros_like(single))
