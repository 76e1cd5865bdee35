"""Vocabulary-parallel log-probs and KL on 4 local gloo ranks (`rlkernels bench --ops
vocab_parallel`): rlkernels.distributed.vocab_parallel against all-gathering the
logit shards and calling the op on the full vocabulary, the way a user without it
would.  Each rank holds an uneven shard of a 50257 (GPT-2) vocabulary.

Rows: time per call (forward and backward, slowest rank, median after warm-up) and,
in the params, the bytes each rank receives: 5 float32 a token from every other rank
for vocab_parallel, the other ranks' logit columns for the all-gather.

Run alone: python -m rlkernels.benchmarks.vocab_parallel [--quick]"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from .distributed import _case

WORLD = 4
VOCAB = 50257


def _bounds(rank: int, world: int) -> tuple[int, int]:
    weights = [(r % 3) + 1 for r in range(world)]
    cuts = [0]
    for w in weights[:-1]:
        cuts.append(cuts[-1] + VOCAB * w // sum(weights))
    cuts.append(VOCAB)
    return cuts[rank], cuts[rank + 1]


def _gathered_logits(shard: torch.Tensor, world: int) -> torch.Tensor:
    """The full [N, V] logits from every rank's shard (padded to the widest shard for
    the all_gather), differentiable back to this rank's shard as a plain all-gather
    user would write it (gradient sliced back)."""
    widths = [_bounds(r, world)[1] - _bounds(r, world)[0] for r in range(world)]
    widest = max(widths)
    padded = torch.nn.functional.pad(shard.detach(), (0, widest - shard.shape[-1]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rank = dist.get_rank()
    parts[rank] = torch.nn.functional.pad(shard, (0, widest - shard.shape[-1]))  # keeps the graph to the shard
    return torch.cat([p[..., :w] for p, w in zip(parts, widths)], -1)


def bench_rank(rank: int, world: int, quick: bool) -> list[dict]:
    import rlkernels
    from rlkernels.distributed import vocab_parallel as VP

    warmup, repeats = (1, 3) if quick else (2, 7)
    N = 256 if quick else 2048
    v0, v1 = _bounds(rank, world)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, VOCAB, (N,), generator=g)
    rows = []
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        full = torch.randn(N, VOCAB, generator=g).to(dtype)
        ref_full = torch.randn(N, VOCAB, generator=g).to(dtype)
        shard = full[:, v0:v1].contiguous().requires_grad_(True)
        ref_shard = ref_full[:, v0:v1].contiguous()
        gathered_bytes = N * (VOCAB - (v1 - v0)) * full.element_size()
        stats_bytes = VP.traffic_bytes(N, world)

        def vp_logprobs(check):
            def step():
                shard.grad = None
                VP.logprobs(shard, labels, group=None, vocab_start=v0, check=check).sum().backward()
            return step

        def gather_logprobs():
            shard.grad = None
            rlkernels.logprobs(_gathered_logits(shard, world), labels).sum().backward()

        params = {"ranks": world, "N": N, "V": VOCAB, "dtype": str(dtype).replace("torch.", ""),
                  "received_mb_vocab_parallel": round(stats_bytes / 2**20, 3),
                  "received_mb_all_gather": round(gathered_bytes / 2**20, 1),
                  "traffic_saved": f"{gathered_bytes / stats_bytes:.0f}x"}
        rows.append(_case("vocab_parallel logprobs fwd+bwd", params, 0,
                          [("all_gather logits + rlkernels.logprobs", True, gather_logprobs),
                           ("vocab_parallel.logprobs (check=False)", False, vp_logprobs(False)),
                           ("vocab_parallel.logprobs (check=True)", False, vp_logprobs(True))],
                          warmup, repeats))

        def vp_kl():
            return VP.kl_from_logits(shard.detach(), ref_shard, group=None, check=False)

        def gather_kl():
            with torch.no_grad():
                return rlkernels.kl_from_logits(_gathered_logits(shard.detach(), world),
                                                _gathered_logits(ref_shard, world))

        rows.append(_case("vocab_parallel kl_from_logits fwd", {**params, "received_mb_all_gather":
                                                                round(2 * gathered_bytes / 2**20, 1),
                                                                "traffic_saved": f"{2 * gathered_bytes / stats_bytes:.0f}x"},
                          0, [("all_gather both logits + rlkernels.kl_from_logits", True, gather_kl),
                              ("vocab_parallel.kl_from_logits (check=False)", False, vp_kl)], warmup, repeats))
    for row in rows:
        row["family"] = "vocab_parallel"
    return rows


def run(device: str, quick: bool) -> list[dict]:
    """Every case on WORLD local gloo ranks (CPU tensors: NCCL needs a GPU per rank)."""
    from rlkernels.distributed._launch import run_ranks, values_or_raise

    del device
    rows = values_or_raise(run_ranks(bench_rank, WORLD, args=(quick,), timeout_s=900, pg_timeout_s=300))[0]
    for row in rows:
        print(f"vocab_parallel/{row['name']} {row['params']}: "
              + ", ".join(f"{r['label']} {r['median_ms']:.1f} ms" for r in row["results"]), flush=True)
    return rows


if __name__ == "__main__":
    run("cpu", "--quick" in sys.argv)
