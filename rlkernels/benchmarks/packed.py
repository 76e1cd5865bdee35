"""Packed (padding-free) batches against padded ones: a GRPO-shaped batch whose
completion lengths are drawn from 16 to 4096 tokens (seeded), run once as a padded
`[S, max_len]` batch and once packed into `[1, total]` with cu_seqlens.

The packed path gathers onto the same `[S, max_len]` grid and runs the padded kernel
(see rlkernels/ops/_packed.py), so both process S * max_len token slots; the params
say how many of those are real tokens.  The timing shows what the gather index and
the two gathers cost on top of the padded call."""
from __future__ import annotations

import torch

import rlkernels
from .harness import Case, Impl


def grpo_lengths(num_seqs: int, low: int, high: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (num_seqs,), generator=g).tolist()


def _backend(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return "cuda" if rlkernels._library.has_compiled("cuda") else "triton"


def _fwd_bwd(fn, leaf):
    def step():
        return torch.autograd.grad(fn()[0], leaf)
    return step


def cases(device: str, quick: bool) -> list[Case]:
    S, low, high = (8, 16, 256) if quick else (64, 16, 4096)
    lengths = grpo_lengths(S, low, high)
    total, L = sum(lengths), max(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    valid = torch.arange(L, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)
    backend = _backend(device)
    params = {"S": S, "lengths": f"{low}..{high}", "tokens": total, "padded_slots": S * L,
              "padding": f"{1 - total / (S * L):.0%}", "tokens_processed": S * L, "pass": "fwd+bwd"}

    def packed_and_padded():
        x = torch.randn(total, device=device)
        grid = torch.zeros(S, L, device=device)
        grid[valid] = x
        return x.unsqueeze(0), grid

    lp, lp_grid = packed_and_padded()
    old, old_grid = (t + 0.1 * torch.randn_like(t) for t in (lp, lp_grid))
    lp.requires_grad_()
    lp_grid.requires_grad_()
    adv = torch.randn(S, device=device)
    kw = dict(loss_type="dapo", clip_high=0.28, backend=backend)
    out = []
    impls = [
        Impl("padded", _fwd_bwd(lambda: rlkernels.grpo_loss(lp_grid, old_grid, adv, valid, **kw), lp_grid),
             baseline=True),
        Impl("packed", _fwd_bwd(lambda: rlkernels.grpo_loss(lp, old, adv, cu_seqlens=cu, max_seqlen=L, **kw), lp)),
    ]
    out.append(Case("packed", "grpo_loss packed vs padded", params, S * L * 13, impls))

    impls = [
        Impl("padded", _fwd_bwd(lambda: (rlkernels.sequence_logprobs(lp_grid, valid, backend=backend).sum(),),
                                lp_grid), baseline=True),
        Impl("packed", _fwd_bwd(lambda: (rlkernels.sequence_logprobs(lp, cu_seqlens=cu, max_seqlen=L,
                                                                     backend=backend).sum(),), lp)),
    ]
    out.append(Case("packed", "sequence_logprobs packed vs padded", params, S * L * 9, impls))

    rewards, rewards_grid = packed_and_padded()
    values, values_grid = packed_and_padded()
    gae_params = {**params, "pass": "fwd"}
    impls = [
        Impl("padded", lambda: rlkernels.gae(rewards_grid, values_grid, valid, gamma=0.99, lam=0.95,
                                             backend=backend), baseline=True),
        Impl("packed", lambda: rlkernels.gae(rewards, values, cu_seqlens=cu, max_seqlen=L, gamma=0.99, lam=0.95,
                                             backend=backend)),
    ]
    out.append(Case("packed", "gae packed vs padded", gae_params, S * L * 17, impls))
    return out
