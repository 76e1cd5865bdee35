"""Advantage estimators written as RL frameworks write them: a loop over time,
vectorised over the batch.  Accumulates in float32 (float64 stays float64)."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype

__all__ = ["gae", "discounted_returns"]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, *,
        dones: torch.Tensor | None = None, last_values: torch.Tensor | None = None,
        gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For t = T-1..0: delta = r_t + gamma*next_value - v_t; a = delta + gamma*lam*carry;
    a valid step (mask 1) sets next_value = v_t and carry = a, a masked one keeps both;
    adv_t = carry.  dones[t] = 1 zeroes next_value and carry before step t."""
    acc = acc_dtype(torch.promote_types(rewards.dtype, values.dtype))
    rewards, values = rewards.to(acc), values.to(acc)
    B, T = rewards.shape
    next_value = last_values.to(acc) if last_values is not None else rewards.new_zeros(B)
    carry = rewards.new_zeros(B)
    advantages = torch.empty_like(rewards)
    zero = rewards.new_zeros(())
    for t in reversed(range(T)):
        if dones is not None:
            done = dones[:, t].bool()
            next_value = torch.where(done, zero, next_value)
            carry = torch.where(done, zero, carry)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * carry
        if mask is None:
            next_value, carry = values[:, t], a
        else:
            valid = mask[:, t].bool()
            next_value = torch.where(valid, values[:, t], next_value)
            carry = torch.where(valid, a, carry)
        advantages[:, t] = carry
    return advantages, advantages + values


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
                       dones: torch.Tensor | None = None, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma*G_{t+1} over valid steps; a masked step repeats the next valid G."""
    rewards = rewards.to(acc_dtype(rewards.dtype))
    B, T = rewards.shape
    carry = rewards.new_zeros(B)
    returns = torch.empty_like(rewards)
    zero = rewards.new_zeros(())
    for t in reversed(range(T)):
        if dones is not None:
            carry = torch.where(dones[:, t].bool(), zero, carry)
        g = rewards[:, t] + gamma * carry
        carry = g if mask is None else torch.where(mask[:, t].bool(), g, carry)
        returns[:, t] = carry
    return returns
