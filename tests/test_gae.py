"""gae and discounted_returns: every backend against the reference, adversarial
masks, episode boundaries, opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, assert_close, low_precision_bound

SHAPES = [(1, 1), (3, 7), (64, 7), (1, 1024), (64, 1024), (64, 129)]
# The Triton kernels scan time with tl.associative_scan, which the interpreter runs one
# element at a time (~1 ms each): the large shapes run on a GPU only, and the tiles'
# crossings are reached at small sizes in test_gae_tiles.py.
heavy = pytest.mark.interpreter_heavy(lambda p: p["B"] * p["T"] > 4096)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_mask(B, T, kind, device="cpu"):
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(B, T, device=device) > 0.3
    if kind == "gaps":  # response with interior observation gaps, right padding, an empty row
        mask = torch.zeros(B, T, dtype=torch.bool, device=device)
        for b in range(B):
            start, end = b % 3, max(T - (b % 5), 0)
            mask[b, start:end] = True
            mask[b, start + (end - start) // 3: start + (end - start) // 2] = False
        mask[B // 2] = False
        return mask
    raise AssertionError(kind)


def rollout(B, T, dtype, device="cpu"):
    rewards = torch.randn(B, T, device=device).to(dtype)
    values = torch.randn(B, T, device=device).to(dtype)
    return rewards, values


def check_against_truth(ours, torch_same, truth, dtype, valid=None):
    if valid is not None:
        ours, torch_same, truth = ours[valid], torch_same[valid], truth[valid]
    if dtype == torch.float64:
        assert ours.dtype == torch.float64
        assert_close(ours, truth)
    else:
        assert ours.dtype == torch.float32
        low_precision_bound(ours, torch_same, truth, floor=1e-5)


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "random", "gaps"])
@heavy
def test_gae_matches_reference(backend_device, B, T, dtype, mask_kind):
    backend, device = backend_device
    rewards, values = rollout(B, T, dtype, device)
    mask = make_mask(B, T, mask_kind, device)
    kw = dict(gamma=0.99, lam=0.95)
    adv, ret = rlkernels.gae(rewards, values, mask, backend=backend, **kw)
    truth = reference.gae(rewards.double(), values.double(), mask, **kw)
    same = reference.gae(rewards, values, mask, **kw)
    check_against_truth(adv, same[0], truth[0], dtype)
    check_against_truth(ret, same[1], truth[1], dtype)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.5), (0.9, 0.0), (0.5, 1.0)])
def test_gae_dones_and_bootstrap(backend_device, gamma, lam):
    backend, device = backend_device
    B, T = 5, 33
    rewards, values = rollout(B, T, torch.float64, device)
    dones = torch.rand(B, T, device=device) > 0.85
    mask = make_mask(B, T, "random", device)
    last = torch.randn(B, dtype=torch.float64, device=device)
    adv, ret = rlkernels.gae(rewards, values, mask, dones=dones, last_values=last, gamma=gamma, lam=lam,
                             backend=backend)
    exp_adv, exp_ret = reference.gae(rewards, values, mask, dones=dones, last_values=last, gamma=gamma, lam=lam)
    assert_close(adv, exp_adv)
    assert_close(ret, exp_ret)


def test_gae_reference_matches_textbook():
    """Without masks the recurrence is the textbook one: A_t = sum_k (gamma*lam)^k delta_{t+k}."""
    B, T, gamma, lam = 2, 9, 0.9, 0.8
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    last = torch.randn(B, dtype=torch.float64)
    next_v = torch.cat([v[:, 1:], last[:, None]], dim=1)
    delta = r + gamma * next_v - v
    expected = torch.zeros_like(r)
    for t in range(T):
        for k in range(T - t):
            expected[:, t] += (gamma * lam) ** k * delta[:, t + k]
    adv, ret = reference.gae(r, v, last_values=last, gamma=gamma, lam=lam)
    assert_close(adv, expected)
    adv_cpu, _ = rlkernels.gae(r, v, last_values=last, gamma=gamma, lam=lam)
    assert_close(adv_cpu, expected)


def test_gae_masked_slots_do_not_leak(backend_device):
    backend, device = backend_device
    B, T = 4, 50
    rewards, values = rollout(B, T, torch.float32, device)
    mask = make_mask(B, T, "gaps", device)
    poison = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], device=device)
    idx = torch.randint(0, 4, (B, T), device=device)
    rewards_p = torch.where(mask, rewards, poison[idx])
    values_p = torch.where(mask, values, poison[(idx + 1) % 4])
    adv, ret = rlkernels.gae(rewards_p, values_p, mask, gamma=0.99, lam=0.95, backend=backend)
    clean_adv, clean_ret = rlkernels.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, clean_adv)
    assert torch.equal(ret[mask], clean_ret[mask])
    returns = rlkernels.discounted_returns(rewards_p, mask, gamma=0.9, backend=backend)
    assert torch.isfinite(returns).all()
    assert torch.equal(returns, rlkernels.discounted_returns(rewards, mask, gamma=0.9, backend=backend))


def test_gae_fully_masked_row_is_zero(backend_device):
    backend, device = backend_device
    rewards, values = rollout(3, 8, torch.float32, device)
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[1] = False
    adv, ret = rlkernels.gae(rewards, values, mask, backend=backend)
    assert torch.equal(adv[1], torch.zeros(8, device=device))
    assert torch.equal(ret[1], values[1])


@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "gaps"])
@heavy
def test_discounted_returns_matches_reference(backend_device, B, T, dtype, mask_kind):
    backend, device = backend_device
    rewards = torch.randn(B, T, device=device).to(dtype)
    mask = make_mask(B, T, mask_kind, device)
    dones = torch.rand(B, T, device=device) > 0.9
    out = rlkernels.discounted_returns(rewards, mask, dones=dones, gamma=0.97, backend=backend)
    truth = reference.discounted_returns(rewards.double(), mask, dones=dones, gamma=0.97)
    same = reference.discounted_returns(rewards, mask, dones=dones, gamma=0.97)
    check_against_truth(out, same, truth, dtype)


def test_float_masks_are_accepted():
    rewards, values = rollout(3, 6, torch.float32)
    mask = make_mask(3, 6, "random")
    expected = rlkernels.gae(rewards, values, mask, gamma=0.9, lam=0.9)
    for as_dtype in (torch.float32, torch.int64, torch.uint8):
        got = rlkernels.gae(rewards, values, mask.to(as_dtype), gamma=0.9, lam=0.9)
        assert torch.equal(got[0], expected[0])


def test_mixed_input_dtypes_promote():
    rewards, values = rollout(3, 6, torch.float32)
    adv, _ = rlkernels.gae(rewards, values.double())
    assert adv.dtype == torch.float64


def test_empty_batch(backend_device):
    backend, device = backend_device
    for B, T in [(0, 5), (4, 0)]:
        rewards, values = rollout(B, T, torch.float32, device)
        adv, ret = rlkernels.gae(rewards, values, backend=backend)
        assert adv.shape == (B, T) and ret.shape == (B, T)
        assert rlkernels.discounted_returns(rewards, backend=backend).shape == (B, T)


def test_strided_inputs_are_accepted():
    base = torch.randn(4, 20)
    rewards, values = base[:, ::2], base.t().contiguous().t()[:, 1::2]
    adv, _ = rlkernels.gae(rewards, values, gamma=0.9, lam=0.9)
    expected, _ = reference.gae(rewards.contiguous(), values.contiguous(), gamma=0.9, lam=0.9)
    assert_close(adv, expected)


# ---- torch.library integration ----------------------------------------------------------------

def _samples():
    rewards, values = rollout(3, 11, torch.float32)
    mask = make_mask(3, 11, "random")
    dones = torch.rand(3, 11) > 0.8
    yield (rewards, values, mask, dones, torch.randn(3), 0.99, 0.95)
    yield (rewards.double(), values.double(), None, None, None, 1.0, 1.0)
    yield (rewards.bfloat16(), values.bfloat16(), mask, None, None, 0.9, 0.5)


@pytest.mark.parametrize("sample", list(_samples()), ids=["masked", "f64", "bf16"])
def test_gae_opcheck(sample):
    torch.library.opcheck(torch.ops.rlkernels.gae.default, sample)
    r, v, m, d, lv, g, l = sample
    torch.library.opcheck(torch.ops.rlkernels.discounted_returns.default, (r, m, d, g))


def test_triton_opcheck():
    if not TRITON_ON_CPU:
        pytest.skip("Triton cannot run on CPU tensors here (TRITON_INTERPRET=1 needed)")
    rewards, values = rollout(3, 5, torch.float32)
    mask = make_mask(3, 5, "random")
    torch.library.opcheck(torch.ops.rlkernels.gae_triton.default, (rewards, values, mask, None, None, 0.9, 0.9))
    torch.library.opcheck(torch.ops.rlkernels.discounted_returns_triton.default, (rewards, mask, None, 0.9))


def test_torch_compile_fullgraph():
    rewards, values = rollout(4, 9, torch.float32)
    mask = make_mask(4, 9, "random")

    @torch.compile(fullgraph=True, backend="eager")
    def step(r, v, m):
        adv, ret = rlkernels.gae(r, v, m, gamma=0.99, lam=0.95)
        return adv * 2, rlkernels.discounted_returns(r, m, gamma=0.9)

    adv2, returns = step(rewards, values, mask)
    assert_close(adv2, 2 * reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)[0])
    assert_close(returns, reference.discounted_returns(rewards, mask, gamma=0.9))


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(values=torch.randn(3, 5)), ValueError, "values must have the shape of rewards"),
    (dict(rewards=torch.ones(3, 4, dtype=torch.int64)), TypeError, "rewards must have dtype"),
    (dict(rewards=torch.randn(12)), ValueError, "rewards must be 2-D"),
    (dict(gamma=1.5), ValueError, "gamma must be <= 1.0"),
    (dict(lam=-0.1), ValueError, "lam must be >= 0.0"),
    (dict(gamma="0.9"), TypeError, "gamma must be a number"),
    (dict(mask=torch.full((3, 4), 2.0)), ValueError, "mask must hold only 0 and 1"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(dones=torch.ones(4, 3, dtype=torch.bool)), ValueError, "dones must have shape"),
    (dict(last_values=torch.randn(4)), ValueError, "last_values must have shape"),
    (dict(values=torch.randn(3, 4, device="meta")), ValueError, "values is on meta but rewards is on cpu"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is unavailable"),
])
def test_gae_bad_input(kwargs, error, match):
    args = dict(rewards=torch.randn(3, 4), values=torch.randn(3, 4), mask=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rlkernels.gae(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


def test_batch_invariance_and_determinism(backend_device):
    """A row's advantages do not depend on the other rows of its batch, and repeated
    calls are bitwise identical (fixed order of operations on every backend)."""
    backend, device = backend_device
    rewards, values = rollout(9, 37, torch.float32, device)
    mask = make_mask(9, 37, "gaps", device)
    full_adv, full_ret = rlkernels.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    for rows in (slice(0, 1), slice(3, 8), slice(4, 9)):
        adv, ret = rlkernels.gae(rewards[rows], values[rows], mask[rows], gamma=0.99, lam=0.95, backend=backend)
        assert torch.equal(adv, full_adv[rows])
        assert torch.equal(ret, full_ret[rows])
    again = rlkernels.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    assert torch.equal(again[0], full_adv) and torch.equal(again[1], full_ret)
