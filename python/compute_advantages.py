"""Own training code, step 1: advantages and returns for a rollout batch.

A batch of LLM rollouts: each row is prompt padding + a response with a few
tool-output (observation) tokens in the middle and right padding.  The value
head's estimates and a terminal reward per row are made up here; in a real
loop they come from your critic and reward model.  Run:

    python python/compute_advantages.py [--batch 8] [--length 64]
"""
from __future__ import annotations

import argparse

import torch

import rlkernels


def make_rollouts(batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    response_mask = torch.zeros(batch, length, dtype=torch.bool)
    rewards = torch.zeros(batch, length)
    for b in range(batch):
        end = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        response_mask[b, :end] = True
        gap = int(torch.randint(1, max(end // 2, 2), (1,), generator=g))
        response_mask[b, gap: gap + 3] = False       # observation tokens: not the policy's
        rewards[b, end - 1] = float(torch.rand((), generator=g) > 0.5)  # terminal reward
    values = torch.randn(batch, length, generator=g) * 0.1
    values[~response_mask] = float("nan")            # junk where the critic was not asked
    return rewards, values, response_mask


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    rewards, values, mask = make_rollouts(args.batch, args.length)
    advantages, returns = rlkernels.gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=args.backend)
    advantages = rlkernels.masked_whiten(advantages, mask, backend=args.backend)

    # GRPO-style alternative: one scalar score per completion, 4 completions per prompt.
    scores = rewards.sum(dim=1)
    group_size = 4 if args.batch % 4 == 0 else 1
    group_adv, zero_variance = rlkernels.group_advantages(scores, group_size, backend=args.backend)

    summary = {
        "tokens": int(mask.sum()),
        "advantage_mean": float(rlkernels.masked_mean(advantages, mask)),
        "return_mean": float(rlkernels.masked_mean(torch.nan_to_num(returns), mask)),
        "finite": bool(torch.isfinite(advantages[mask]).all() and torch.isfinite(returns[mask]).all()),
        "grpo_advantages": [round(float(a), 4) for a in group_adv],
        "zero_variance_groups": int(zero_variance.sum()),
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    return summary


if __name__ == "__main__":
    main()
