"""PPO-RLHF steps on a transformers causal LM, written as your own training code
that calls the rlkernels ops directly (copy it with lm_example.py and adapt).

    python python/ppo_step.py                       # a tiny random GPT-2, no download
    python python/ppo_step.py --model ./my-llama    # any local causal LM directory

Per step: sample responses with `generate`; log-probs of the policy and the frozen
reference straight from the last hidden states (`rlkernels.linear_logprobs`: the
[tokens, vocab] logits are never materialised); a per-token KL penalty
(`rlkernels.kl_penalty`) plus the sequence score as rewards; GAE over the response mask
(`rlkernels.gae`); whitened advantages (`rlkernels.masked_whiten`); then PPO epochs with
`rlkernels.ppo_loss`, `rlkernels.value_loss` and an entropy bonus.  The reward here
is a stand-in (the share of even token ids); put your reward model there."""
from __future__ import annotations

import torch
from torch import nn

import rlkernels
from lm_example import log_step, parser, policy_and_reference, sample, score


def response_logprobs(model, sequences, attention, prompt_len, labels, *, entropy=False):
    """Per-token log-probs of the response tokens (and entropies), plus the hidden
    states that predicted them (for the value head)."""
    hidden = model.base_model(input_ids=sequences, attention_mask=attention).last_hidden_state
    states = hidden[:, prompt_len - 1:-1]
    head = model.get_output_embeddings()
    out = rlkernels.linear_logprobs(states, head.weight, labels, bias=head.bias, entropy=entropy)
    return out, states


def main(argv=None) -> list[dict]:
    p = parser(__doc__, steps=20, model_help="local transformers model directory (default: tiny random GPT-2)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--kl-coef", type=float, default=0.05)
    args = p.parse_args(argv)

    device, policy, reference = policy_and_reference(args)
    value_head = nn.Linear(policy.config.hidden_size, 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(value_head.parameters()), lr=args.lr)
    history = []
    for step in range(args.steps):
        # ---- rollout (no gradients)
        with torch.no_grad():
            prompts = torch.randint(2, policy.config.vocab_size, (args.batch, args.prompt_len), device=device)
            sequences, responses, mask, attention, labels = sample(policy, prompts, args.response_len)
            old_logprobs, states = response_logprobs(policy, sequences, attention, args.prompt_len, labels)
            old_values = value_head(states).squeeze(-1)
            ref_logprobs, _ = response_logprobs(reference, sequences, attention, args.prompt_len, labels)
            scores = score(responses, mask)
            kl = rlkernels.kl_penalty(old_logprobs, ref_logprobs, "k1") * mask
            rewards = -args.kl_coef * kl
            last = mask.sum(-1) - 1
            rewards[torch.arange(args.batch, device=device), last] += scores
            advantages, returns = rlkernels.gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
            advantages = rlkernels.masked_whiten(advantages, mask)
        # ---- PPO epochs (whole batch per update here; minibatch for larger batches)
        for _ in range(args.epochs):
            (logprobs, entropy), states = response_logprobs(policy, sequences, attention, args.prompt_len, labels,
                                                            entropy=True)
            values = value_head(states).squeeze(-1)
            pg_loss, stats = rlkernels.ppo_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2)
            vf_loss, _ = rlkernels.value_loss(values, old_values, returns, mask, clip=0.2)
            loss = pg_loss + 0.1 * vf_loss - 0.01 * rlkernels.masked_mean(entropy, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
        row = {"step": step + 1, "score": scores.mean().item(), "kl": kl.sum(-1).mean().item(),
               "loss": loss.item(), "clip_frac": (stats["clip_frac_upper"] + stats["clip_frac_lower"]).item()}
        log_step(history, row)
    return history


if __name__ == "__main__":
    main()
