"""GRPO steps on a transformers causal LM, written as your own training code that
calls the rlkernels ops directly (copy and adapt).

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

import argparse
import copy

import torch

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
    return model.to(device).eval()


def score(responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    even = ((responses % 2) == 0) & mask
    return even.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


def response_states(model, sequences, attention, prompt_len):
    hidden = model.base_model(input_ids=sequences, attention_mask=attention).last_hidden_state
    return hidden[:, prompt_len - 1:-1]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--iterations", type=int, default=2, help="updates per batch (GRPO's mu)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    policy = build_model(args.model, device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    head, ref_head = policy.get_output_embeddings(), reference.get_output_embeddings()
    eos, pad = policy.config.eos_token_id, policy.config.pad_token_id or 0
    history = []
    for step in range(args.steps):
        with torch.no_grad():
            prompts = torch.randint(2, policy.config.vocab_size, (args.prompts, args.prompt_len), device=device)
            prompts = prompts.repeat_interleave(args.group, 0)  # each group: one prompt, --group samples
            sequences = policy.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                                        max_new_tokens=args.response_len, min_new_tokens=args.response_len,
                                        pad_token_id=pad)
            responses = sequences[:, args.prompt_len:]
            is_eos = responses == eos
            mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
            attention = torch.cat([torch.ones_like(prompts), mask.long()], 1)
            labels = responses.masked_fill(~mask, -100)
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
        history.append(row)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return history


if __name__ == "__main__":
    main()
