"""A DPO (direct preference optimisation) loop on a transformers causal LM, written as
your own training code that calls the rlkernels ops directly (copy it with lm_example.py and adapt).

    python python/dpo_loop.py                      # tiny random GPT-2, synthetic pairs
    python python/dpo_loop.py --model ./my-model   # any local causal LM directory

Each step packs chosen and rejected completions into one batch, gets per-token
log-probs straight from the last hidden states (`rlkernels.linear_logprobs`), sums
them per completion (`rlkernels.sequence_logprobs`) for the policy and the frozen
reference, and applies `rlkernels.dpo_loss`.  The synthetic preference: completions
made of even token ids are preferred to ones made of odd ids; swap in your own
(prompt, chosen, rejected) token ids."""
from __future__ import annotations

import torch

import rlkernels
from lm_example import log_step, parser, policy_and_reference


def synthetic_pairs(batch: int, prompt_len: int, completion_len: int, vocab: int, generator):
    """(input_ids [2B, L], labels [2B, L-1]): rows 0..B-1 chosen (even ids), B..2B-1 rejected (odd ids)."""
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator)
    half = vocab // 2
    chosen = 2 * torch.randint(0, half, (batch, completion_len), generator=generator)
    rejected = 2 * torch.randint(0, half, (batch, completion_len), generator=generator) + 1
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    labels = ids[:, 1:].clone()
    labels[:, :prompt_len - 1] = -100  # score completion tokens only
    return ids, labels


def completion_logprobs(model, ids, labels):
    """Summed completion log-probs per row, through the fused kernels."""
    hidden = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    token_logprobs = rlkernels.linear_logprobs(hidden, head.weight, labels, bias=head.bias)
    return rlkernels.sequence_logprobs(token_logprobs, labels != -100)


def main(argv=None) -> list[dict]:
    p = parser(__doc__, steps=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--completion-len", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.1)
    args = p.parse_args(argv)

    device, policy, reference = policy_and_reference(args)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    vocab = policy.config.vocab_size
    history = []
    for step in range(args.steps):
        ids, labels = synthetic_pairs(args.batch, args.prompt_len, args.completion_len, vocab, generator)
        ids, labels = ids.to(device), labels.to(device)
        policy_logps = completion_logprobs(policy, ids, labels)
        with torch.no_grad():
            ref_logps = completion_logprobs(reference, ids, labels)
        B = args.batch
        losses, chosen_rewards, rejected_rewards = rlkernels.dpo_loss(
            policy_logps[:B], policy_logps[B:], ref_logps[:B], ref_logps[B:], beta=args.beta)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        margin = chosen_rewards - rejected_rewards
        row = {"step": step + 1, "loss": loss.item(), "margin": margin.mean().item(),
               "accuracy": (margin > 0).float().mean().item()}
        log_step(history, row)
    return history


if __name__ == "__main__":
    main()
