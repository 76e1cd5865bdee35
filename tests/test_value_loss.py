"""value_loss: every backend against the reference and verl's formula, dtypes,
gradients, opcheck and bad input (torch.compile with the policy losses: test_policy_loss.py)."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from rlkernels.reference._token_loss import AGG_MODES
from rlkernels.reference.value_loss import VALUE_STATS
from support import TRITON_ON_CPU, close_stats, finite_scaled_close, loss_and_grad, poisoned, token_mask

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_matches_reference(backend_device, agg, clip):
    backend, device = backend_device
    B, T = 5, 70
    values = torch.randn(B, T, device=device)
    old = values + torch.randn(B, T, device=device) * 0.3
    returns = torch.randn(B, T, device=device)
    mask = token_mask(B, T, device)
    kw = dict(clip=clip, agg=agg)
    loss, stats, grad = loss_and_grad(rlkernels.value_loss, poisoned(values, mask), poisoned(old, mask),
                                      poisoned(returns, mask), mask, backend=backend, **kw)
    t_loss, t_stats, t_grad = loss_and_grad(reference.value_loss, values.double(), old.double(), returns.double(),
                                            mask, **kw)
    assert torch.isfinite(grad).all() and torch.all(grad[~mask] == 0)
    finite_scaled_close(loss, t_loss, what="loss")
    finite_scaled_close(grad, t_grad, what="grad")
    close_stats(stats, t_stats, torch.float32, VALUE_STATS)
    if clip is not None:
        assert 0 < stats["clip_frac"].item() < 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_dtypes(backend_device, dtype):
    backend, device = backend_device
    B, T = 3, 257
    values, old, returns = (torch.randn(B, T, device=device).to(dtype) for _ in range(3))
    loss, stats, grad = loss_and_grad(rlkernels.value_loss, values, old, returns, clip=0.5, backend=backend)
    t_loss, t_stats, t_grad = loss_and_grad(reference.value_loss, values.double(), old.double(), returns.double(),
                                            clip=0.5)
    assert grad.dtype == dtype
    finite_scaled_close(loss, t_loss, dtype, "loss")
    close_stats(stats, t_stats, dtype, VALUE_STATS)
    if dtype != torch.bfloat16:
        finite_scaled_close(grad, t_grad, dtype, "grad")


def test_value_matches_verl_formula():
    B, T = 4, 30
    values, old, returns = (torch.randn(B, T, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(B, T) > 0.3
    vpredclipped = old + torch.clamp(values - old, -0.2, 0.2)
    vf_losses = torch.maximum((values - returns) ** 2, (vpredclipped - returns) ** 2)
    expected = 0.5 * (vf_losses * mask).sum() / mask.sum()
    loss, stats = rlkernels.value_loss(values, old, returns, mask, clip=0.2)
    finite_scaled_close(loss, expected, torch.float64)
    acting = (values - old).abs() > 0.2  # verl also counts rounding noise where the clamp is idle
    clipfrac = (((vpredclipped - returns) ** 2 > (values - returns) ** 2) & acting & mask).sum().double() / mask.sum()
    finite_scaled_close(stats["clip_frac"], clipfrac, torch.float64)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_value_gradcheck(backend, clip):
    values, old, returns = (torch.randn(3, 8, dtype=torch.float64) for _ in range(3))
    mask = token_mask(3, 8, "cpu")
    values.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: rlkernels.value_loss(v, old, returns, mask, clip=clip, agg="seq-mean-token-mean",
                                       backend=backend)[0], (values,))


def test_value_opcheck():
    values, old, returns = (torch.randn(3, 9) for _ in range(3))
    mask = token_mask(3, 9, "cpu")
    for sample in [(values.requires_grad_(), old, returns, mask, [0.2, -1.0, -1.0, -1.0], "token-mean", True),
                   (values.double().detach().requires_grad_(), old.double(), returns.double(), None,
                    [float("inf"), -1.0, 2.0, -1.0], "seq-mean-token-sum", True)]:
        torch.library.opcheck(torch.ops.rlkernels.value_loss.default, sample)
        if TRITON_ON_CPU:
            torch.library.opcheck(torch.ops.rlkernels.value_loss_triton.default, sample)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(returns=torch.randn(3, 5)), ValueError, "returns must have the shape of values"),
    (dict(clip=0.0), ValueError, "clip must be > 0.0"),
    (dict(old_values=None, clip=0.2), ValueError, "old_values is needed when clip is given"),
    (dict(agg="sum"), ValueError, "agg must be one of"),
    (dict(values=torch.ones(3, 4, dtype=torch.int32)), TypeError, "values must have dtype"),
])
def test_value_bad_input(kwargs, error, match):
    args = dict(values=torch.randn(3, 4), old_values=torch.randn(3, 4), returns=torch.randn(3, 4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.value_loss(args.pop("values"), args.pop("old_values"), args.pop("returns"), **args)
