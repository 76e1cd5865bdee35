"""PPO-RLHF steps on a transformers causal LM, written as your own training code
that calls the rlkernels ops directly (copy this file and adapt it).

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

import argparse
import copy

import torch
from torch import nn

import rlkernels


def build_model(path: str | None, device):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if path:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return model.to(device).eval()  # eval(): no dropout; gradients still flow


def score(responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stand-in reward in [0, 1]: the share of even token ids in each response."""
    even = ((responses % 2) == 0) & mask
    return even.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


def response_logprobs(model, sequences, attention, prompt_len, labels, *, entropy=False):
    """Per-token log-probs of the response tokens (and entropies), plus the hidden
    states that predicted them (for the value head)."""
    hidden = model.base_model(input_ids=sequences, attention_mask=attention).last_hidden_state
    states = hidden[:, prompt_len - 1:-1]
    head = model.get_output_embeddings()
    out = rlkernels.linear_logprobs(states, head.weight, labels, bias=head.bias, entropy=entropy)
    return out, states


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local transformers model directory (default: tiny random GPT-2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    policy = build_model(args.model, device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value_head = nn.Linear(policy.config.hidden_size, 1).to(device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    optimizer = torch.optim.Adam(list(policy.parameters()) + list(value_head.parameters()), lr=args.lr)
    eos, pad = policy.config.eos_token_id, policy.config.pad_token_id or 0
    history = []
    for step in range(args.steps):
        # ---- rollout (no gradients)
        with torch.no_grad():
            prompts = torch.randint(2, policy.config.vocab_size, (args.batch, args.prompt_len), device=device)
            sequences = policy.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                                        max_new_tokens=args.response_len, min_new_tokens=args.response_len,
                                        pad_token_id=pad)
            responses = sequences[:, args.prompt_len:]
            is_eos = responses == eos
            mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
            attention = torch.cat([torch.ones_like(prompts), mask.long()], 1)
            labels = responses.masked_fill(~mask, -100)
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
        history.append(row)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return history


if __name__ == "__main__":
    main()
