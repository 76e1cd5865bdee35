"""A padding-free (packed) GRPO-style step with rlkernels: completions of different
lengths concatenated into one `[1, total]` row, boundaries given by `cu_seqlens`.

Token-wise ops (rlkernels.logprobs, kl_penalty) need nothing for packing: they see a
row of tokens.  The ops whose result depends on where a sequence ends (gae,
discounted_returns, sequence_logprobs, ppo_loss / grpo_loss / value_loss) take
`cu_seqlens=` (or `position_ids=`) and give what the padded batch gives.  The script
checks that against the padded batch of the same sequences and prints both.

    python python/packed_batch.py --device cpu --seqs 6 --max-len 64
"""
from __future__ import annotations

import argparse

import torch

import rlkernels


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seqs", type=int, default=8, help="completions in the batch")
    p.add_argument("--max-len", type=int, default=128, help="longest completion")
    p.add_argument("--vocab", type=int, default=97)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    dev = args.device
    lengths = torch.randint(1, args.max_len + 1, (args.seqs,), generator=g)
    total, longest = int(lengths.sum()), int(lengths.max())
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)]).to(dev)
    # position_ids restarting at 0 describe the same boundaries (TRL's padding_free collator)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0).to(dev)

    # The policy's logits over the packed row, and the sampled tokens.
    logits = torch.randn(1, total, args.vocab, generator=g).to(dev).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, total), generator=g).to(dev)
    old_logprobs = rlkernels.logprobs(logits.detach(), labels) + 0.05 * torch.randn(1, total, generator=g).to(dev)
    scores = torch.randn(args.seqs, generator=g).to(dev)
    advantages, _ = rlkernels.group_advantages(scores, group_size=args.seqs)   # one prompt, S samples

    # Token-wise: the packed row is just tokens.
    logprobs = rlkernels.logprobs(logits, labels)                                   # [1, total]
    # Per sequence: cu_seqlens (max_seqlen spares a CUDA call its one host read).
    loss, stats = rlkernels.grpo_loss(logprobs, old_logprobs, advantages, loss_type="grpo",
                                      cu_seqlens=cu_seqlens, max_seqlen=longest)
    loss.backward()
    seq_logprobs = rlkernels.sequence_logprobs(logprobs.detach(), position_ids=position_ids)   # [S]

    # The same sequences padded to [S, longest]: the same numbers.
    valid = torch.arange(longest, device=dev) < lengths.to(dev).unsqueeze(1)
    grid = torch.zeros(args.seqs, longest, device=dev)
    grid[valid] = logprobs.detach().reshape(-1)
    old_grid = torch.zeros_like(grid)
    old_grid[valid] = old_logprobs.reshape(-1)
    padded_loss, _ = rlkernels.grpo_loss(grid, old_grid, advantages, valid, loss_type="grpo")
    padded_seq = rlkernels.sequence_logprobs(grid, valid)
    loss = loss.detach()
    row = {"tokens": total, "padded_slots": args.seqs * longest, "loss": float(loss), "padded_loss": float(padded_loss),
           "same_loss": bool(torch.equal(loss, padded_loss)),
           "same_sequence_logprobs": bool(torch.equal(seq_logprobs, padded_seq)),
           "clip_frac": float(stats["clip_frac_upper"] + stats["clip_frac_lower"]),
           "grad_norm": float(logits.grad.norm())}
    print(f"packed {total} tokens (padded: {args.seqs * longest} slots): loss {row['loss']:.6f}, "
          f"padded {row['padded_loss']:.6f}, equal: {row['same_loss']}; sequence log-probs equal: "
          f"{row['same_sequence_logprobs']}; clip_frac {row['clip_frac']:.3f}")
    return row


if __name__ == "__main__":
    main()
