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
        for args in [(scores, None, 4, 3, 0, 0, 1e-6), (scores.double(), index, 0, 3, 1, 1, 1e-6)]:
            torch.library.opcheck(torch.ops.rlkernels.group_advantages_triton.default, args)

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


def _shuffled_groups(sizes, generator):
    """Ids for groups of the given sizes (0: an empty group), at shuffled positions."""
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return ids[torch.randperm(ids.numel(), generator=generator)]


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_group_advantages_shuffled_ids(backend_device, baseline, scale, id_dtype):
    """Odd group sizes at shuffled positions, empty groups (first, inner, last), a group of
    one and one spanning several of the Triton kernel's blocks (fitted to the mean group,
    16 here): every backend matches the reference, and the CPU backend."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(13)
    sizes = [0, 3, 1, 5, 0, 7, 37, 2, 9, 0]
    index = _shuffled_groups(sizes, g)
    scores = torch.randn(index.numel(), generator=g, dtype=torch.float64) * 3
    scores[index == 3] = 1.5  # an all-equal group
    kw = dict(num_groups=len(sizes), baseline=baseline, scale=scale)
    adv, equal = rlkernels.group_advantages(scores.to(device), group_index=index.to(id_dtype).to(device),
                                            backend=backend, **kw)
    truth, truth_equal = reference.group_advantages(scores, group_index=index, **kw)
    assert_close(adv, truth)
    assert torch.equal(equal.cpu(), truth_equal)
    assert equal.cpu().tolist() == [True, False, True, True, True, False, False, False, False, True]
    on_cpu, _ = rlkernels.group_advantages(scores, group_index=index, backend="cpu", **kw)
    assert_close(adv, on_cpu)
    low, _ = rlkernels.group_advantages(scores.float().to(device), group_index=index.to(device), backend=backend, **kw)
    assert_close(low, truth, dtype=torch.float32)


def test_group_advantages_no_scores(backend_device):
    backend, device = backend_device
    for ids in (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32)):
        adv, equal = rlkernels.group_advantages(torch.empty(0, device=device), group_index=ids.to(device),
                                                num_groups=0, backend=backend)
        assert adv.shape == (0,) and equal.shape == (0,) and adv.dtype == torch.float32


triton_here = pytest.mark.skipif(not TRITON_ON_CPU and not torch.cuda.is_available(), reason="Triton does not run here")


def _triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@triton_here
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_triton_ids_in_runs_and_interleaved_give_the_contiguous_bits(scale, baseline):
    """A group's members are summed in index order in blocks fitted to the mean group:
    ids in runs of group_size give the group_size path's bits, and so do the same groups
    interleaved (member j of group g at j * G + g): a group's result depends on its own
    scores only, wherever they lie."""
    device = _triton_device()
    G, size = 5, 23  # one block of 32 per group, partly idle
    scores = torch.randn(G * size, device=device) * 3 + 50
    kw = dict(baseline=baseline, scale=scale, backend="triton")
    contiguous, equal = rlkernels.group_advantages(scores, size, **kw)
    runs = torch.arange(G, device=device).repeat_interleave(size)
    by_ids, by_ids_equal = rlkernels.group_advantages(scores, group_index=runs, num_groups=G, **kw)
    assert torch.equal(by_ids, contiguous) and torch.equal(by_ids_equal, equal)
    interleaved = scores.view(G, size).t().contiguous().view(-1)  # position j * G + g holds member j of group g
    ids = torch.arange(G, device=device).repeat(size)
    out, out_equal = rlkernels.group_advantages(interleaved, group_index=ids, num_groups=G, **kw)
    assert torch.equal(out.view(size, G).t().reshape(-1), contiguous) and torch.equal(out_equal, equal)


@triton_here
def test_triton_programs_read_their_own_runs(monkeypatch):
    """The launch gets the id-sorted order (stable) and each group's run in it, one
    program per group, so a program reads starts[g + 1] - starts[g] members, not all N
    scores; the block fits the mean group, not the batch."""
    from rlkernels.triton import group_advantages as module

    launches = []
    kernel = module._group_advantages_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, args, kwargs))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, "_group_advantages_kernel", Recorder())
    device = _triton_device()
    g = torch.Generator().manual_seed(5)
    sizes = [4, 0, 1, 6, 3, 0, 2, 20]
    index = _shuffled_groups(sizes, g)
    scores = torch.randn(index.numel(), generator=g)
    adv, _ = rlkernels.group_advantages(scores.to(device), group_index=index.to(device), num_groups=len(sizes),
                                        backend="triton")
    assert_close(adv, reference.group_advantages(scores.double(), group_index=index, num_groups=len(sizes))[0],
                 dtype=torch.float32)
    (grid, args, kwargs), = launches
    _, order, starts = args[:3]
    assert grid == (len(sizes),) and kwargs["HAS_INDEX"]
    assert torch.equal(order.cpu(), torch.sort(index, stable=True).indices)
    assert starts.cpu().tolist() == [0, 4, 4, 5, 11, 14, 14, 16, 36]
    assert torch.equal(index[order.cpu()], torch.sort(index).values)
    assert kwargs["BLOCK"] == 16 < index.numel()


@triton_here
@pytest.mark.parametrize("num_groups", [1, 3])
def test_triton_stray_ids_past_a_block_give_nan(num_groups):
    """Ids below 0 sort before the first group's run and ids from num_groups on after the
    last one: the first program flags both tails (more than a block each here) with NaN,
    as the CUDA op does; the groups keep their own results."""
    device = _triton_device()
    g = torch.Generator().manual_seed(3)
    index = torch.randint(-40, num_groups + 40, (300,), generator=g)
    scores = torch.randn(300, generator=g, dtype=torch.float64)
    stray = (index < 0) | (index >= num_groups)
    assert stray[index < 0].sum() > 16 and stray[index >= num_groups].sum() > 16
    adv, equal = torch.ops.rlkernels.group_advantages_triton(scores.to(device), index.to(device), 0, num_groups,
                                                             0, 0, 1e-6)
    assert torch.equal(adv.isnan().cpu(), stray)
    kept = ~stray
    truth, truth_equal = reference.group_advantages(scores[kept], group_index=index[kept], num_groups=num_groups)
    assert_close(adv.cpu()[kept], truth)
    assert torch.equal(equal.cpu(), truth_equal)
