"""Policy, value and preference losses, forward + backward: rlkernels' fused ops
against the same losses composed from PyTorch ops the way verl and TRL write them
(lean versions: no input sanitising, the statistics those frameworks log)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import rlkernels
from .harness import Case, Impl


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def verl_ppo_loss(logprobs, old_logprobs, advantages, mask, clip=0.2, dual_clip=3.0):
    """verl's compute_policy_loss (vanilla, dual clip) with token-mean agg_loss and its logged stats."""
    negative_approx_kl = torch.clamp(logprobs - old_logprobs, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = _masked_mean(-negative_approx_kl, mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    pg_losses3 = -advantages * dual_clip
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = _masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = _masked_mean(pg_losses, mask)
    return pg_loss, (pg_clipfrac, ppo_kl, pg_clipfrac_lower)


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
                  beta=0.04, eps_low=0.2, eps_high=0.28):
    """TRL GRPOTrainer.compute_loss (loss_type grpo, k3 KL) with its logged stats."""
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2) + beta * per_token_kl
    loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    count = completion_mask.sum().clamp(min=1.0)
    mean_kl = (per_token_kl * completion_mask).sum() / count
    is_low = (coef_1 < 1 - eps_low) & (advantages.unsqueeze(1) < 0)
    is_high = (coef_1 > 1 + eps_high) & (advantages.unsqueeze(1) > 0)
    return loss, (mean_kl, (is_low * completion_mask).sum() / count, (is_high * completion_mask).sum() / count)


def verl_value_loss(vpreds, values, returns, mask, cliprange_value=0.2):
    """verl's compute_value_loss with token-mean aggregation and vf_clipfrac."""
    vpredclipped = values + torch.clamp(vpreds - values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * _masked_mean(clipped, mask)
    vf_clipfrac = _masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)
    return vf_loss, vf_clipfrac


def trl_dpo(policy_logps, ref_logps, mask, B, beta=0.1):
    """TRL: per-sequence log-probs by masked sums, then dpo_loss (sigmoid)."""
    seq = (policy_logps * mask).sum(-1)
    ref = (ref_logps * mask).sum(-1)
    logits = (seq[:B] - seq[B:]) - (ref[:B] - ref[B:])
    losses = -F.logsigmoid(beta * logits)
    return losses.mean(), beta * (seq[:B] - ref[:B]).detach(), beta * (seq[B:] - ref[B:]).detach()


def rlkernels_dpo(policy_logps, ref_logps, mask, B, backend, beta=0.1):
    seq = rlkernels.sequence_logprobs(policy_logps, mask, backend=backend)
    ref = rlkernels.sequence_logprobs(ref_logps, mask, backend=backend)
    losses, chosen, rejected = rlkernels.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=beta, backend=backend)
    return losses.mean(), chosen, rejected


def rlkernels_dpo_fused(policy_logps, ref_logps, mask, backend, beta=0.1):
    """The same step as one fused op (rlkernels.dpo_sequence_loss)."""
    losses, chosen, rejected = rlkernels.dpo_sequence_loss(policy_logps, ref_logps, mask, beta=beta, backend=backend)
    return losses.mean(), chosen, rejected


def _backends(device):
    found = ["cpu"] if device == "cpu" else (["cuda"] if rlkernels._library.has_compiled("cuda") else [])
    if device == "cuda" and rlkernels.HAS_TRITON:
        found.append("triton")
    return found


def _fwd_bwd(loss_fn, leaf):
    def step():
        loss = loss_fn()[0]
        return torch.autograd.grad(loss, leaf)
    return step


def cases(device: str, quick: bool) -> list[Case]:
    shapes = [(16, 256)] if quick else [(64, 2048), (256, 1024)]
    out = [case for B, T in shapes for case in _cases_for(device, B, T)]
    if hasattr(rlkernels, "linear_ppo_loss"):
        out += _linear_cases(device, *((256, 256, 8192) if quick else (2048, 1024, 50257)))
    return out


def composed_linear_ppo_loss(hidden, weight, labels, old, advantages, mask):
    """The usual pipeline: full logits, log_softmax, gather, then verl's loss."""
    logits = hidden @ weight.t()
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return verl_ppo_loss(logprobs, old, advantages, mask)


def _linear_cases(device: str, N: int, H: int, V: int) -> list[Case]:
    hidden = (torch.randn(1, N, H, device=device) * 0.5).requires_grad_()
    weight = (torch.randn(V, H, device=device) * H ** -0.5).requires_grad_()
    labels = torch.randint(0, V, (1, N), device=device)
    with torch.no_grad():
        old = torch.log_softmax(hidden[0] @ weight.t(), -1).gather(-1, labels[0, :, None]).squeeze(-1)[None]
        old = old + torch.randn_like(old) * 0.1
    advantages = torch.randn(1, N, device=device)
    mask = torch.ones(1, N, dtype=torch.bool, device=device)
    params = {"N": N, "H": H, "V": V, "dtype": "float32", "pass": "fwd+bwd"}

    def step(fn):
        def run():
            loss = fn()[0]
            return torch.autograd.grad(loss, (hidden, weight))
        return run

    impls = [Impl(f"rlkernels-{b}", step(lambda b=b: rlkernels.linear_ppo_loss(
        hidden, weight, labels, old, advantages, mask, dual_clip=3.0, backend=b))) for b in _backends(device)]
    impls.append(Impl("composed", step(lambda: composed_linear_ppo_loss(hidden, weight, labels, old, advantages,
                                                                        mask.float())), baseline=True))
    # Least traffic: read hidden and weight, write their gradients.
    return [Case("losses", "linear_ppo_loss", params, 2 * 4 * (N * H + V * H), impls,
                 repeats=(1, 3) if N * V > 2**26 else None)]  # seconds per call at the full shape


def _cases_for(device: str, B: int, T: int) -> list[Case]:
    """The cases of one shape (a function of its own, so each closure sees its own tensors)."""
    out = []
    params = {"B": B, "T": T, "dtype": "float32", "mask": True, "pass": "fwd+bwd"}
    logprobs = (-torch.rand(B, T, device=device) * 3).requires_grad_()
    old = logprobs.detach() + torch.randn(B, T, device=device) * 0.2
    ref = logprobs.detach() + torch.randn(B, T, device=device) * 0.2
    advantages = torch.randn(B, T, device=device)
    seq_advantages = torch.randn(B, device=device)
    mask = torch.rand(B, T, device=device) > 0.1
    maskf = mask.float()

    # Least traffic of a fused fwd+bwd: read logprobs, old, advantages (4 B), mask (1 B); write the gradient (4 B).
    impls = [Impl(f"rlkernels-{b}", _fwd_bwd(lambda b=b: rlkernels.ppo_loss(
        logprobs, old, advantages, mask, dual_clip=3.0, backend=b), logprobs)) for b in _backends(device)]
    impls.append(Impl("verl-composed", _fwd_bwd(lambda: verl_ppo_loss(logprobs, old, advantages, maskf),
                                                logprobs), baseline=True))
    out.append(Case("losses", "ppo_loss", params, B * T * 17, impls))

    impls = [Impl(f"rlkernels-{b}", _fwd_bwd(lambda b=b: rlkernels.grpo_loss(
        logprobs, old, seq_advantages, mask, ref_logprobs=ref, beta=0.04, clip_high=0.28, backend=b), logprobs))
        for b in _backends(device)]
    impls.append(Impl("trl-composed", _fwd_bwd(lambda: trl_grpo_loss(logprobs, old, ref, seq_advantages, maskf),
                                               logprobs), baseline=True))
    out.append(Case("losses", "grpo_loss", params, B * T * 17, impls))

    values = torch.randn(B, T, device=device).requires_grad_()
    old_values = values.detach() + torch.randn(B, T, device=device) * 0.3
    returns = torch.randn(B, T, device=device)
    impls = [Impl(f"rlkernels-{b}", _fwd_bwd(lambda b=b: rlkernels.value_loss(
        values, old_values, returns, mask, clip=0.2, backend=b), values)) for b in _backends(device)]
    impls.append(Impl("verl-composed", _fwd_bwd(lambda: verl_value_loss(values, old_values, returns, maskf),
                                                values), baseline=True))
    out.append(Case("losses", "value_loss", params, B * T * 17, impls))

    # DPO from token log-probs: chosen and rejected rows stacked ([2B', T]); the composed
    # rlkernels ops (sequence_logprobs twice, dpo_loss) and the fused dpo_sequence_loss.
    pairs = B // 2
    impls = [Impl(f"rlkernels-{b}", _fwd_bwd(lambda b=b: rlkernels_dpo(logprobs, ref, mask, pairs, b), logprobs))
             for b in _backends(device)]
    impls += [Impl(f"rlkernels-fused-{b}", _fwd_bwd(lambda b=b: rlkernels_dpo_fused(logprobs, ref, mask, b), logprobs))
              for b in _backends(device)]
    impls.append(Impl("trl-composed", _fwd_bwd(lambda: trl_dpo(logprobs, ref, maskf, pairs), logprobs),
                      baseline=True))
    out.append(Case("losses", "dpo_loss+sequence_logprobs", {**params, "pairs": pairs}, B * T * 13, impls))
    return out
