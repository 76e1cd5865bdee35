"""rlkernels.discounted_returns: REINFORCE reward-to-go with carry-through masking."""
from __future__ import annotations

import torch

from .. import _backend, reference
from .._dtypes import acc_dtype
from ._rollout import rollout

_OP = "discounted_returns"


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
                       dones: torch.Tensor | None = None, gamma: float = 1.0,
                       backend: str = "auto") -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} for rollouts `[B, T]`, computed backwards.  A masked
    step (mask 0) repeats the return of the next valid step; dones[b, t] = 1 ends an
    episode after step t.  float32 output (float64 for float64 input)."""
    rewards, _, mask, dones, gamma, _, device = rollout(_OP, rewards, mask, dones, gamma=gamma)
    chosen = _backend.resolve(_OP, backend, device)
    with torch.no_grad():
        if chosen == "reference":
            return reference.discounted_returns(rewards, mask, dones=dones, gamma=gamma)
        fn = torch.ops.rlkernels.discounted_returns_triton if chosen == "triton" else torch.ops.rlkernels.discounted_returns
        return fn(rewards, mask, dones, gamma)


def _discounted_returns_fake(rewards, mask, dones, gamma):
    torch._check(rewards.dim() == 2, lambda: "rewards must be [B, T]")
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))


def register(op_name: str) -> None:
    """Fake kernel of an op with the discounted_returns schema."""
    torch.library.register_fake(op_name)(_discounted_returns_fake)


register("rlkernels::discounted_returns")
