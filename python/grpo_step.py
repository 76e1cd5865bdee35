"""GRPO steps on a transformers causal LM, written as your own training code that
calls the rlkernels ops directly (copy it with lm_example.py and adapt).

    python python/grpo_step.py                      # tiny random GPT-2, no download
    python python/grpo_step.py --model ./my-model   # any local causal LM directory

Per step: `--group` samples for each of `--prompts` prompts with `generate`; scores
turned into group-relative advantages (`rlkernels.group_advantages`: (s - mean) / std
within each prompt's group); the sampling policy's and the frozen reference's token
log-probs from their last hidden states (`rlkernels.linear_logprobs`); then
`--iterations` updates with `rlkernels.linear_ppo_loss`, which goes from the policy's
hidden states and lm-head straight to GRPO's loss (clipped surrogate plus beta times the
k3 KL, averaged per sequence then over sequences as GRPO does) without ever holding the
[tokens, vocab] logits.  The reward is a stand-in (the share of even token ids); put
your scorer there."""
from __future__ import annotations

import torch

import rlkernels
from lm_example import log_step, parser, policy_and_reference, sample, score


def response_states(model, sequences, attention, prompt_len):
    hidden = model.base_model(input_ids=sequences, attention_mask=attention).last_hidden_state
    return hidden[:, prompt_len - 1:-1]


def main(argv=None) -> list[dict]:
    p = parser(__doc__, steps=20)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--iterations", type=int, default=2, help="updates per batch (GRPO's mu)")
    args = p.parse_args(argv)

    device, policy, reference = policy_and_reference(args)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    head, ref_head = policy.get_output_embeddings(), reference.get_output_embeddings()
    history = []
    for step in range(args.steps):
        with torch.no_grad():
            prompts = torch.randint(2, policy.config.vocab_size, (args.prompts, args.prompt_len), device=device)
            prompts = prompts.repeat_interleave(args.group, 0)  # each group: one prompt, --group samples
            sequences, responses, mask, attention, labels = sample(policy, prompts, args.response_len)
            scores = score(responses, mask)
            advantages, _ = rlkernels.group_advantages(scores, args.group)
            ref_states = response_states(reference, sequences, attention, args.prompt_len)
            ref_logprobs = rlkernels.linear_logprobs(ref_states, ref_head.weight, labels, bias=ref_head.bias)
            old_states = response_states(policy, sequences, attention, args.prompt_len)
            old_logprobs = rlkernels.linear_logprobs(old_states, head.weight, labels, bias=head.bias)
        for _ in range(args.iterations):
            states = response_states(policy, sequences, attention, args.prompt_len)
            loss, stats = rlkernels.linear_ppo_loss(states, head.weight, labels, old_logprobs, advantages, mask,
                                                    bias=head.bias, ref_logprobs=ref_logprobs, beta=args.beta,
                                                    kl="k3", agg="seq-mean-token-mean", log_ratio_clamp=None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        row = {"step": step + 1, "score": scores.mean().item(), "loss": loss.item(),
               "kl": float(stats["kl"]) if "kl" in stats else float("nan")}
        log_step(history, row)
    return history


if __name__ == "__main__":
    main()
