"""group_advantages against the reference and its formulas, opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, assert_close, matches_truth

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


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
    matches_truth(adv, truth, same, dtype)
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


def test_opcheck_and_compile():
    scores = torch.randn(12)
    index = torch.randint(0, 3, (12,))
    for args in [(scores, None, 4, 3, 0, 0, 1e-6), (scores.double(), index, 0, 3, 1, 1, 1e-6)]:
        torch.library.opcheck(torch.ops.rlkernels.group_advantages.default, args)
    if TRITON_ON_CPU:
        torch.library.opcheck(torch.ops.rlkernels.group_advantages_triton.default, (scores, None, 4, 3, 0, 0, 1e-6))

    @torch.compile(fullgraph=True, backend="eager")
    def fn(s):
        adv, _ = rlkernels.group_advantages(s, 4)
        return adv.sum()

    out = fn(scores)
    expected = reference.group_advantages(scores, 4)[0].sum()
    assert_close(out, expected, dtype=torch.float32)


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
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not TRITON_ON_CPU and not torch.cuda.is_available(), reason="Triton does not run here")
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("N,group_size", [(4100, 2050), (96, 32), (9, 1)])
def test_triton_contiguous_groups_read_only_their_own(monkeypatch, scale, N, group_size):
    """Contiguous groups: each Triton program reads its own group (in blocks fitted to
    it: 2050 spans three of 1024), so a NaN score poisons its group alone; the batch std
    comes from one multi-program pass (slices lowered to 64 entries here)."""
    from rlkernels.triton import masked as triton_masked
    monkeypatch.setattr(triton_masked, "_SLICE", 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = torch.randn(N, dtype=torch.float64, device=device) * 3 + 100
    adv, equal = rlkernels.group_advantages(scores.float(), group_size, scale=scale, backend="triton")
    truth, truth_equal = reference.group_advantages(scores, group_size, scale=scale)
    same, _ = reference.group_advantages(scores.float(), group_size, scale=scale)
    matches_truth(adv, truth, same, torch.float32)
    assert torch.equal(equal.cpu(), truth_equal.cpu())
    if N // group_size > 1 and group_size > 1 and scale != "batch":  # a group of one is 0 whatever its score
        poisoned = scores.float().clone()
        poisoned[group_size - 1] = float("nan")
        adv_p, equal_p = rlkernels.group_advantages(poisoned, group_size, scale=scale, backend="triton")
        assert torch.isnan(adv_p[:group_size]).all() and not bool(equal_p[0])
        assert torch.equal(adv_p[group_size:], adv[group_size:])
