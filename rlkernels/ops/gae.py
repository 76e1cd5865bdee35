"""rlkernels.gae and rlkernels.discounted_returns: generalised advantage estimation
(Schulman et al., 2016) and REINFORCE reward-to-go, with verl's carry-through
masking and episode boundaries."""
from __future__ import annotations

import torch

from .. import _backend, _validate as V, reference
from .._dtypes import acc_dtype
from . import _packed, _registry
from ._rollout import rollout

__all__ = ["gae", "discounted_returns"]

_OP = "gae"


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, *,
        dones: torch.Tensor | None = None, last_values: torch.Tensor | None = None,
        gamma: float = 1.0, lam: float = 1.0, cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, max_seqlen: int | None = None,
        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns for rollouts `[B, T]`, or packed `[total]` / `[1, total]`
    with `cu_seqlens` (or `position_ids`; see docs/advantages.md, "Packed batches").

    For t = T-1 .. 0, starting from next_value = last_values (or 0) and carry = 0::

        delta = r_t + gamma * next_value - v_t
        a     = delta + gamma * lam * carry
        next_value = v_t if mask_t else next_value
        carry      = a   if mask_t else carry
        advantages_t = carry;  returns_t = advantages_t + v_t

    mask: 1 where the policy acted (a response token), 0 for padding or observation
    tokens in multi-turn rollouts; masked steps pass the running values through, and
    NaN or junk in them never reaches valid outputs.  dones[b, t] = 1 ends an episode
    after step t (no bootstrap, no carry across).  last_values `[B]` bootstraps
    truncated rows.  Accumulates in float32 (float64 input stays float64); outputs
    are float32 (float64).  Advantages are constants: no gradient flows.

    Packed: each sequence is a row of its own (no bootstrap, no carry across a
    boundary), last_values is `[S]`, outputs keep the packed layout.
    """
    if cu_seqlens is not None or position_ids is not None:
        pk = _packed.packing(_OP, "rewards", rewards, cu_seqlens, position_ids, max_seqlen)
        advantages, returns = gae(pk.pad(_OP, "rewards", rewards), pk.pad(_OP, "values", values), pk.mask(_OP, mask),
                                  dones=pk.flags(_OP, "dones", dones), last_values=last_values, gamma=gamma,
                                  lam=lam, backend=backend)
        return pk.unpad(advantages), pk.unpad(returns)
    V.float_tensor(_OP, "values", values, ndim=2)  # rollout() reads values=None as "no values"
    V.number(_OP, "lam", lam)  # and lam=None as "no lam"
    rewards, values, mask, dones, gamma, lam, device = rollout(
        _OP, rewards, mask, dones, values=values, gamma=gamma, lam=lam)
    if last_values is not None:
        V.float_tensor(_OP, "last_values", last_values, ndim=1)
        if last_values.shape[0] != rewards.shape[0]:
            raise ValueError(f"{_OP}: last_values must have shape [{rewards.shape[0]}], got {tuple(last_values.shape)}")
        if last_values.device != device:
            raise ValueError(f"{_OP}: last_values is on {last_values.device} but rewards is on {device}")
        last_values = last_values.to(acc_dtype(rewards.dtype)).contiguous()
    chosen = _backend.resolve(_OP, backend, device)
    with torch.no_grad():
        if chosen == "reference":
            return reference.gae(rewards, values, mask, dones=dones, last_values=last_values, gamma=gamma, lam=lam)
        return _registry.kernel("gae", chosen)(rewards, values, mask, dones, last_values, gamma, lam)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
                       dones: torch.Tensor | None = None, gamma: float = 1.0,
                       cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       max_seqlen: int | None = None, backend: str = "auto") -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} for rollouts `[B, T]`, computed backwards.  A masked
    step (mask 0) repeats the return of the next valid step; dones[b, t] = 1 ends an
    episode after step t.  float32 output (float64 for float64 input).  Packed
    `[total]` / `[1, total]` rows take `cu_seqlens` (or `position_ids`): no return
    flows across a sequence boundary; the output keeps the packed layout."""
    if cu_seqlens is not None or position_ids is not None:
        op = "discounted_returns"
        pk = _packed.packing(op, "rewards", rewards, cu_seqlens, position_ids, max_seqlen)
        return pk.unpad(discounted_returns(pk.pad(op, "rewards", rewards), pk.mask(op, mask),
                                           dones=pk.flags(op, "dones", dones), gamma=gamma, backend=backend))
    rewards, _, mask, dones, gamma, _, device = rollout("discounted_returns", rewards, mask, dones, gamma=gamma)
    chosen = _backend.resolve("discounted_returns", backend, device)
    with torch.no_grad():
        if chosen == "reference":
            return reference.discounted_returns(rewards, mask, dones=dones, gamma=gamma)
        return _registry.kernel("discounted_returns", chosen)(rewards, mask, dones, gamma)


def _gae_fake(rewards, values, mask, dones, last_values, gamma, lam):
    torch._check(rewards.dim() == 2, lambda: "rewards must be [B, T]")
    torch._check(values.shape == rewards.shape, lambda: "values must match rewards")
    dtype = acc_dtype(rewards.dtype)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def _discounted_returns_fake(rewards, mask, dones, gamma):
    torch._check(rewards.dim() == 2, lambda: "rewards must be [B, T]")
    return rewards.new_empty(rewards.shape, dtype=acc_dtype(rewards.dtype))


_registry.register("gae", fake=_gae_fake)
_registry.register("discounted_returns", fake=_discounted_returns_fake)
