"""What ppo_step.py, grpo_step.py and dpo_loop.py share: the causal LM they train, the
stand-in reward, sampling responses, the common command-line options and the printed
row of each step.  Copy this file along with the example you adapt."""
from __future__ import annotations

import argparse
import copy

import torch


def build_model(path: str | None, device):
    """A local transformers causal LM, or (no path) a tiny random GPT-2 with EOS 1."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if path:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return model.to(device).eval()  # eval(): no dropout; gradients still flow


def policy_and_reference(args: argparse.Namespace):
    """(device, policy, reference) for parsed options: the model to train on
    --device, and a frozen copy of it as the reference policy."""
    device = torch.device(args.device)
    policy = build_model(args.model, device)
    return device, policy, copy.deepcopy(policy).requires_grad_(False)


def parser(doc: str, *, steps: int, model_help: str | None = None) -> argparse.ArgumentParser:
    """The options every example takes: --model, --steps, --prompt-len, --lr and --device."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def score(responses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stand-in reward in [0, 1]: the share of even token ids in each response."""
    even = ((responses % 2) == 0) & mask
    return even.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


@torch.no_grad()
def sample(policy, prompts: torch.Tensor, response_len: int):
    """Responses of `response_len` tokens sampled after `prompts`.  Returns the full
    sequences, the responses, their mask (up to and including the first EOS), the
    attention mask of the sequences and the labels (-100 outside the mask)."""
    eos, pad = policy.config.eos_token_id, policy.config.pad_token_id or 0
    sequences = policy.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                                max_new_tokens=response_len, min_new_tokens=response_len, pad_token_id=pad)
    responses = sequences[:, prompts.shape[1]:]
    is_eos = responses == eos
    mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    attention = torch.cat([torch.ones_like(prompts), mask.long()], 1)
    labels = responses.masked_fill(~mask, -100)
    return sequences, responses, mask, attention, labels


def log_step(history: list[dict], row: dict) -> None:
    """Appends a step's row to `history` and prints it on one line."""
    history.append(row)
    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
