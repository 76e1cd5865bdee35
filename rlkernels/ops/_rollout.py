"""Validation shared by the ops over [B, T] rollout tensors."""
from __future__ import annotations

import torch

from .. import _validate as V


def rollout(op: str, rewards, mask, dones, *, values=None, gamma=1.0, lam=None):
    """Checks a rollout batch and returns (rewards, values, mask, dones, gamma, lam,
    device) ready for a kernel: [B, T] contiguous floats of one dtype, bool masks."""
    V.float_tensor(op, "rewards", rewards, ndim=2)
    if values is not None:
        V.float_tensor(op, "values", values, ndim=2)
        V.same_shape(op, "values", values, "rewards", rewards)
        common = torch.promote_types(rewards.dtype, values.dtype)
        rewards, values = rewards.to(common), values.to(common)
        values = values.contiguous()
    device = V.same_device(op, rewards=rewards, values=values, mask=mask, dones=dones)
    gamma = V.number(op, "gamma", gamma, low=0.0, high=1.0)
    if lam is not None:
        lam = V.number(op, "lam", lam, low=0.0, high=1.0)
    mask = V.binary_mask(op, "mask", mask, rewards.shape, device)
    dones = V.binary_mask(op, "dones", dones, rewards.shape, device)
    return rewards.contiguous(), values, mask, dones, gamma, lam, device
