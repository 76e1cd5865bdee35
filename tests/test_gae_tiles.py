"""The Triton GAE and discounted-return kernels' tiles (rlkernels/triton/gae.py): a
reverse scan of affine maps over [rows, steps] tiles, the state carried from tile to
tile.  Tiles are lowered to 32 elements here so that interpreter-sized rollouts cross
several of them (and tiles hold several rows): masks, dones at and across tile
edges, last_values, poison under the mask, float64, and batch invariance."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import DEVICES, assert_close, backends_for, low_precision_bound

triton_devices = [d for d in DEVICES if "triton" in backends_for(d)]
pytestmark = pytest.mark.skipif(not triton_devices, reason="no device runs the Triton kernels here")
# (B, T): 3 tiles of 16 steps with a partial first one, rows 2 to a tile, one long row
SHAPES = [(5, 37), (3, 7), (2, 70), (1, 33)]


@pytest.fixture(params=triton_devices)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    from rlkernels.triton import gae as triton_gae
    monkeypatch.setattr(triton_gae, "_TILE", 32)


def rollout(B, T, dtype, device, poison=float("nan")):
    rewards = torch.randn(B, T, dtype=torch.float64, device=device)
    values = torch.randn(B, T, dtype=torch.float64, device=device)
    mask = torch.rand(B, T, device=device) > 0.3
    mask[0, T // 2:] = False                     # right padding across tiles
    dones = torch.rand(B, T, device=device) > 0.85
    dones[:, T - 16 if T > 16 else 0] = True     # a reset at a tile's first step
    rewards = torch.where(mask, rewards, poison).to(dtype)
    values = torch.where(mask, values, poison).to(dtype)
    return rewards, values, mask, dones


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("with_dones", [False, True])
def test_gae_tiles_match_reference(device, dtype, B, T, with_dones):
    rewards, values, mask, dones = rollout(B, T, dtype, device)
    dones = dones if with_dones else None
    last = torch.randn(B, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    kw = dict(gamma=0.99, lam=0.95, dones=dones, last_values=last)
    adv, ret = rlkernels.gae(rewards, values, mask, backend="triton", **kw)
    truth = reference.gae(rewards.double(), values.double(), mask, **{**kw, "last_values": last.double()})
    same = reference.gae(rewards, values, mask, **kw)
    assert torch.isfinite(adv).all()
    for ours, expected, torch_same in ((adv, truth[0], same[0]), (ret[mask], truth[1][mask], same[1][mask])):
        if dtype == torch.float64:
            assert_close(ours, expected)
        else:
            low_precision_bound(ours, torch_same, expected, floor=1e-5)
    returns = rlkernels.discounted_returns(rewards, mask, dones=dones, gamma=0.9, backend="triton")
    expected = reference.discounted_returns(rewards.double(), mask, dones=dones, gamma=0.9)
    if dtype == torch.float64:
        assert_close(returns, expected)
    else:
        low_precision_bound(returns, reference.discounted_returns(rewards, mask, dones=dones, gamma=0.9), expected,
                            floor=1e-5)


def test_gae_tiles_unmasked_and_degenerate_coefficients(device):
    """No mask (every step valid), and gamma or lam of 0: a zero coefficient resets
    the carry as the sequential loop does, never 0 * inf."""
    rewards, values, _, _ = rollout(3, 40, torch.float32, device)
    rewards, values = rewards.nan_to_num(0.5), values.nan_to_num(-0.5)
    for gamma, lam in ((0.99, 0.95), (0.0, 0.9), (0.9, 0.0), (1.0, 1.0)):
        adv, ret = rlkernels.gae(rewards, values, gamma=gamma, lam=lam, backend="triton")
        truth = reference.gae(rewards.double(), values.double(), gamma=gamma, lam=lam)
        same = reference.gae(rewards, values, gamma=gamma, lam=lam)
        low_precision_bound(adv, same[0], truth[0], floor=1e-5)
        low_precision_bound(ret, same[1], truth[1], floor=1e-5)
    huge = rewards.clone()
    huge[:, 10] = float("inf")               # an infinite reward before a reset
    dones = torch.zeros(3, 40, dtype=torch.bool, device=device)
    dones[:, 5] = True
    adv, _ = rlkernels.gae(huge, values, dones=dones, gamma=0.9, lam=0.9, backend="triton")
    truth, _ = reference.gae(huge.double(), values.double(), dones=dones, gamma=0.9, lam=0.9)
    assert torch.equal(torch.isfinite(adv), torch.isfinite(truth))
    assert_close(adv[:, :5], truth[:, :5])


def test_gae_tiles_batch_invariance_and_poison(device):
    """A row's results are the same bits in any batch (the tile shape follows T alone)
    and do not see what lies under the mask."""
    rewards, values, mask, dones = rollout(7, 37, torch.float32, device)
    full = rlkernels.gae(rewards, values, mask, dones=dones, gamma=0.99, lam=0.95, backend="triton")
    full_returns = rlkernels.discounted_returns(rewards, mask, dones=dones, gamma=0.9, backend="triton")
    for rows in (slice(0, 1), slice(2, 5), slice(6, 7)):
        part = rlkernels.gae(rewards[rows].clone(), values[rows].clone(), mask[rows].clone(),
                             dones=dones[rows].clone(), gamma=0.99, lam=0.95, backend="triton")
        assert torch.equal(part[0], full[0][rows]) and torch.equal(part[1][mask[rows]], full[1][rows][mask[rows]])
        returns = rlkernels.discounted_returns(rewards[rows].clone(), mask[rows].clone(), dones=dones[rows].clone(),
                                               gamma=0.9, backend="triton")
        assert torch.equal(returns, full_returns[rows])
    clean = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    again = rlkernels.gae(*clean, mask, dones=dones, gamma=0.99, lam=0.95, backend="triton")
    assert torch.equal(again[0], full[0])
    assert torch.equal(rlkernels.discounted_returns(clean[0], mask, dones=dones, gamma=0.9, backend="triton"),
                       full_returns)
