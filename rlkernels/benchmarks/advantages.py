"""Advantage estimators: rlkernels against the per-timestep loop RL frameworks
write (rlkernels.reference) and the best vectorised PyTorch we could write (a
log-step affine scan, below)."""
from __future__ import annotations

import torch

import rlkernels
from rlkernels import reference
from .harness import Case, Impl


def _next_valid_values(values, mask, last_values):
    """For each t, the value at the first valid step after t (last_values past the end)."""
    B, T = values.shape
    steps = torch.arange(T, device=values.device).expand(B, T)
    first_valid_from = torch.where(mask, steps, torch.full_like(steps, T))
    first_valid_from = first_valid_from.flip(1).cummin(1).values.flip(1)
    after = torch.cat([first_valid_from[:, 1:], torch.full_like(steps[:, :1], T)], dim=1)
    padded = torch.cat([values, last_values[:, None]], dim=1)
    return padded.gather(1, after)


def _reverse_affine_scan(coef, offset):
    """x_t = coef_t * x_{t+1} + offset_t with x_T = 0, in log2(T) vectorised steps."""
    T = coef.shape[1]
    shift = 1
    while shift < T:
        offset = offset.clone()
        offset[:, :-shift] += coef[:, :-shift] * offset[:, shift:]
        coef = coef.clone()
        coef[:, :-shift] *= coef[:, shift:]
        shift *= 2
    return offset


def gae_vectorised(rewards, values, mask, last_values, gamma, lam):
    next_values = _next_valid_values(values, mask, last_values)
    delta = rewards + gamma * next_values - values
    coef = torch.where(mask, torch.full_like(delta, gamma * lam), torch.ones_like(delta))
    advantages = _reverse_affine_scan(coef, torch.where(mask, delta, torch.zeros_like(delta)))
    return advantages, advantages + values


def discounted_returns_vectorised(rewards, mask, gamma):
    coef = torch.where(mask, torch.full_like(rewards, gamma), torch.ones_like(rewards))
    return _reverse_affine_scan(coef, torch.where(mask, rewards, torch.zeros_like(rewards)))


def _backends(device):
    found = ["cpu"] if device == "cpu" else (["cuda"] if rlkernels._library.has_compiled("cuda") else [])
    if device == "cuda" and rlkernels.HAS_TRITON:
        found.append("triton")
    return found


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    shapes = [(64, 256)] if quick else [(256, 1024), (64, 4096)]
    gamma, lam = 0.99, 0.95
    for B, T in shapes:
        rewards = torch.randn(B, T, device=device)
        values = torch.randn(B, T, device=device)
        mask = torch.rand(B, T, device=device) > 0.2
        last = torch.zeros(B, device=device)
        impls = [Impl(f"rlkernels-{b}", lambda b=b: rlkernels.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=b))
                 for b in _backends(device)]
        impls.append(Impl("torch-loop", lambda: reference.gae(rewards, values, mask, gamma=gamma, lam=lam), baseline=True))
        impls.append(Impl("torch-vectorised", lambda: gae_vectorised(rewards, values, mask, last, gamma, lam), baseline=True))
        # Read rewards, values (4 B), mask (1 B); write advantages, returns (4 B).
        out.append(Case("advantages", "gae", {"B": B, "T": T, "dtype": "float32", "mask": True}, B * T * 17, impls))

        impls = [Impl(f"rlkernels-{b}", lambda b=b: rlkernels.discounted_returns(rewards, mask, gamma=gamma, backend=b))
                 for b in _backends(device)]
        impls.append(Impl("torch-loop", lambda: reference.discounted_returns(rewards, mask, gamma=gamma), baseline=True))
        impls.append(Impl("torch-vectorised", lambda: discounted_returns_vectorised(rewards, mask, gamma), baseline=True))
        out.append(Case("advantages", "discounted_returns", {"B": B, "T": T, "dtype": "float32", "mask": True},
                        B * T * 9, impls))

        impls = [Impl(f"rlkernels-{b}", lambda b=b: rlkernels.masked_whiten(rewards, mask, backend=b))
                 for b in _backends(device)]
        impls.append(Impl("torch", lambda: reference.masked_whiten(rewards, mask), baseline=True))
        out.append(Case("advantages", "masked_whiten", {"B": B, "T": T, "dtype": "float32"}, B * T * 9, impls))

        impls = [Impl(f"rlkernels-{b}", lambda b=b: rlkernels.masked_mean(rewards, mask, dim=-1, backend=b))
                 for b in _backends(device)]
        impls.append(Impl("torch", lambda: (rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1), baseline=True))
        out.append(Case("advantages", "masked_mean", {"B": B, "T": T, "dtype": "float32", "dim": -1}, B * T * 5,
                        impls))

    N, G = (1024, 16) if quick else (16384, 16)
    scores = torch.randn(N, device=device)
    impls = [Impl(f"rlkernels-{b}", lambda b=b: rlkernels.group_advantages(scores, G, backend=b))
             for b in _backends(device)]
    impls.append(Impl("torch", lambda: reference.group_advantages(scores, G), baseline=True))
    out.append(Case("advantages", "group_advantages", {"N": N, "group_size": G}, N * 8, impls))
    return out
