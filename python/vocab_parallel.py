"""Own training code: log-probs over an lm-head split across ranks (tensor parallel).

A tiny policy (embedding, one hidden layer) whose lm-head weight [V, H] is cut by
hand into one contiguous block of rows per rank, as Megatron-style tensor
parallelism holds it.  Each step every rank computes the full-vocabulary log-probs
and entropy of the sampled tokens with rlkernels.distributed.vocab_parallel, from
its own rows of the head only: the ranks exchange 5 float32 a token, never logits.
The trunk is replicated, and its gradient arrives summed over the shards, so the
replicas stay equal.  Step 0 also checks the result against the unsharded head.

    torchrun --nproc_per_node 2 python/vocab_parallel.py [--steps 5] [--vocab 1000]
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

import rlkernels
from rlkernels.distributed import vocab_parallel


def shard_rows(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's block of head rows: contiguous, in rank order, sizes differ by at most one."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=16)
    args = p.parse_args(argv)

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full model on every rank, before it is split
    embed = torch.nn.Embedding(args.vocab, args.hidden)
    trunk = torch.nn.Linear(args.hidden, args.hidden)
    full_head = torch.randn(args.vocab, args.hidden) * 0.2
    v0, v1 = shard_rows(args.vocab, world, rank)
    head = torch.nn.Parameter(full_head[v0:v1].clone())  # this rank's rows only
    params = [*embed.parameters(), *trunk.parameters(), head]
    optimizer = torch.optim.SGD(params, lr=0.5)

    g = torch.Generator().manual_seed(1)  # the same batch on every rank
    tokens = torch.randint(0, args.vocab, (args.batch, args.length + 1), generator=g)
    rows = []
    for step in range(args.steps):
        hidden = torch.tanh(trunk(embed(tokens[:, :-1])))
        logprobs, entropy = vocab_parallel.linear_logprobs(hidden, head, tokens[:, 1:], group=None, entropy=True,
                                                           vocab_start=v0, timeout=60)
        loss = -logprobs.mean() - 0.01 * entropy.mean()  # maximum likelihood with an entropy bonus
        if step == 0:
            with torch.no_grad():  # the unsharded op on the whole head, for comparison
                whole = rlkernels.linear_logprobs(hidden, full_head, tokens[:, 1:])
                worst = float((whole - logprobs).abs().max())
            assert worst < 1e-4, f"sharded and unsharded log-probs differ by {worst}"
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        row = {"step": step, "rank": rank, "loss": float(loss), "entropy": float(entropy.mean())}
        rows.append(row)
        if rank == 0:
            print(f"step {step}: loss {row['loss']:.4f}  entropy {row['entropy']:.4f}  "
                  f"(head rows {v0}:{v1} of {args.vocab} on rank 0, {world} ranks)", flush=True)
    return rows


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown (gloo threads; docs/distributed.md)
