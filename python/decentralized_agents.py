"""Own training code: several agents, each in its own environment, averaging what
they learned with rlkernels.distributed.

Each agent trains a small policy with REINFORCE on a contextual bandit whose best
arm depends on the agent (its "environment"); every --every steps the agents run
one averaging round (theta_global <- theta_global + alpha * mean_i(delta_i), or a
gossip round with the ring neighbours).  Launch one process per agent:

    torchrun --standalone --nproc-per-node 4 python/decentralized_agents.py --mode ring
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 python/decentralized_agents.py        # several machines

On GPUs pass --device cuda (NCCL, one GPU per process).
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from rlkernels.distributed import DecentralizedAverager, exit_without_teardown


def environment_batch(rank: int, batch: int, features: int, arms: int, gen: torch.Generator, device):
    """Contexts and a reward table: arm (argmax of a fixed projection + the agent's
    own offset) pays 1, the others 0."""
    contexts = torch.randn(batch, features, generator=gen).to(device)
    projection = torch.linspace(-1, 1, features * arms).view(features, arms).to(device)
    best = (contexts @ projection + torch.arange(arms, device=device).eq(rank % arms) * 0.5).argmax(dim=1)
    return contexts, best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["allreduce", "ring", "gossip"], default="allreduce")
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=120.0, help="process-group timeout in seconds")
    args = parser.parse_args(argv)

    use_cuda = args.device == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    features, arms = 8, 4
    torch.manual_seed(rank)  # agents start apart; allreduce/ring modes broadcast rank 0's weights
    policy = torch.nn.Sequential(torch.nn.Linear(features, 32), torch.nn.Tanh(), torch.nn.Linear(32, arms)).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-2)
    averager = DecentralizedAverager(policy, mode=args.mode, every=args.every, alpha=args.alpha,
                                     optimizer=optimizer, average_optimizer_state=True)
    gen = torch.Generator().manual_seed(1000 + rank)
    reward = 0.0
    for _ in range(args.steps):
        contexts, best = environment_batch(rank, 64, features, arms, gen, device)
        dist_actions = torch.distributions.Categorical(logits=policy(contexts))
        actions = dist_actions.sample()
        rewards = (actions == best).float()
        loss = -((rewards - rewards.mean()) * dist_actions.log_prob(actions)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        averager.step()
        reward = rewards.mean().item()

    flat = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    spread = max((other - flat).abs().max().item() for other in everyone)
    summary = {"rank": rank, "world": world, "mode": args.mode, "rounds": averager.rounds,
               "last_reward": reward, "max_param_spread": spread}
    if rank == 0:
        print(summary, flush=True)
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
    exit_without_teardown()  # gloo's teardown can abort after a clean run (docs/distributed.md)
