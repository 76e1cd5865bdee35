"""linear_ppo_loss equals logits -> log-probs -> ppo_loss composed from the reference:
values and gradients w.r.t. hidden, weight and bias, with KL and entropy terms."""
from __future__ import annotations

import importlib

import pytest
import torch

import rlkernels
from rlkernels import reference
from rlkernels.reference._token_loss import aggregate
from support import scaled_close

_lpl = importlib.import_module("rlkernels.ops.linear_ppo_loss")


def composed(hidden, weight, bias, labels, old, adv, mask, *, ref=None, beta=0.0, entropy_coef=0.0,
             temperature=1.0, **ppo):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss, stats = reference.ppo_loss(lp, old, adv, mask, ref_logprobs=ref if beta > 0 else None, kl_coef=beta,
                                     kl="k3", **ppo)
    if entropy_coef:
        entropy = torch.where(mask, -(logp.exp() * logp).sum(-1), 0)
        agg = {k: ppo[k] for k in ("agg", "num_tokens", "num_seqs", "norm_length") if k in ppo}
        loss = loss - entropy_coef * aggregate(entropy, mask, agg.pop("agg", "token-mean"), **agg)
    return loss, stats


def problem(B, T, H, V, dtype, device):
    hidden = torch.randn(B, T, H, device=device, dtype=dtype)
    weight = torch.randn(V, H, device=device, dtype=dtype) * 0.3
    bias = torch.randn(V, device=device, dtype=dtype) * 0.1
    labels = torch.randint(0, V, (B, T), device=device)
    with torch.no_grad():
        truth = torch.log_softmax((hidden.double() @ weight.double().t() + bias.double()), -1)
        lp = truth.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    old = (lp + torch.randn(B, T, device=device, dtype=torch.float64) * 0.3).float()
    ref = (lp + torch.randn(B, T, device=device, dtype=torch.float64) * 0.2).float()
    adv = torch.randn(B, T, device=device)
    mask = torch.rand(B, T, device=device) > 0.25
    mask[0] = False
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    return hidden, weight, bias, labels, old, adv, mask, ref


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta,entropy_coef", [(0.0, 0.0), (0.05, 0.01)])
@pytest.mark.parametrize("chunk_size", [5, 16])  # row segments, whole rows
@pytest.mark.parametrize("drop_masked", [False, True], ids=["every-token", "drop-masked"])
def test_linear_ppo_loss_matches_composed(backend_device, agg, beta, entropy_coef, chunk_size, drop_masked,
                                          monkeypatch):
    backend, device = backend_device
    if drop_masked:  # small problems send masked tokens through the lm-head; this one drops them as large ones do
        monkeypatch.setattr(_lpl, "_EVERY_TOKEN_MACS", -1)
    B, T, H, V = 3, 7, 16, 50
    hidden, weight, bias, labels, old, adv, mask, ref = problem(B, T, H, V, torch.float32, device)
    kw = dict(beta=beta, entropy_coef=entropy_coef, temperature=0.7, dual_clip=3.0, agg=agg)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, stats = rlkernels.linear_ppo_loss(params[0], params[1], labels, old, adv, mask, bias=params[2],
                                            ref_logprobs=ref, chunk_size=chunk_size, backend=backend, **kw)
    grads = torch.autograd.grad(loss, params)
    truth_params = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    t_loss, t_stats = composed(*truth_params, labels, old.double(), adv.double(), mask, ref=ref.double(), **kw)
    t_grads = torch.autograd.grad(t_loss, truth_params)
    scaled_close(loss, t_loss, what="loss")
    for g, t_g, name in zip(grads, t_grads, ("hidden", "weight", "bias")):
        scaled_close(g, t_g, what=name)
    for name in ("clip_frac_upper", "clip_frac_lower", "approx_kl_k3", "kl"):
        scaled_close(stats[name], t_stats[name], what=name)
    if entropy_coef:
        assert stats["entropy"].item() > 0
    assert torch.all(grads[0][~mask] == 0)


def test_linear_ppo_loss_float64_reference():
    hidden, weight, bias, labels, old, adv, mask, ref = problem(2, 5, 8, 20, torch.float64, "cpu")
    params = [t.clone().requires_grad_() for t in (hidden, weight)]
    assert torch.autograd.gradcheck(
        lambda h, w: rlkernels.linear_ppo_loss(h, w, labels, old.double(), adv.double(), mask,
                                               ref_logprobs=ref.double(), beta=0.1, entropy_coef=0.02,
                                               backend="reference")[0], params)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(hidden=torch.randn(6, 4)), ValueError, "hidden must be 3-D"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "labels must have shape"),
    (dict(beta=0.1), ValueError, "beta > 0 needs ref_logprobs"),
    (dict(beta=-1.0), ValueError, "beta must be >= 0.0"),
    (dict(kl="k7"), ValueError, "kl must be one of"),
    (dict(clip_low=1.2), ValueError, "clip_low must be < 1.0"),
])
def test_linear_ppo_loss_bad_input(kwargs, error, match):
    args = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(10, 4), labels=torch.zeros(2, 3, dtype=torch.int64),
                old_logprobs=torch.zeros(2, 3), advantages=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.linear_ppo_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"),
                                  args.pop("old_logprobs"), args.pop("advantages"), **args)


def test_linear_ppo_loss_without_mask_and_per_sequence_advantages():
    hidden, weight, bias, labels, old, adv, mask, ref = problem(2, 6, 8, 30, torch.float32, "cpu")
    labels = labels.clamp(min=0)
    adv_seq = adv[:, 0]
    params = [t.clone().requires_grad_() for t in (hidden, weight)]
    loss, _ = rlkernels.linear_ppo_loss(params[0], params[1], labels, old, adv_seq, dual_clip=2.0)
    grads = torch.autograd.grad(loss, params)
    truth = [t.double().requires_grad_() for t in (hidden, weight)]
    t_loss, _ = composed(truth[0], truth[1], None, labels, old.double(), adv_seq.double(),
                         torch.ones_like(labels, dtype=torch.bool), dual_clip=2.0)
    scaled_close(loss, t_loss)
    for g, t_g in zip(grads, torch.autograd.grad(t_loss, truth)):
        scaled_close(g, t_g)


def test_linear_ppo_loss_opcheck_and_compile():
    hidden, weight, bias, labels, old, adv, mask, ref = problem(2, 5, 8, 20, torch.float32, "cpu")
    valid = labels != -100
    sample = (hidden.requires_grad_(), weight.requires_grad_(), labels, bias, old, adv, valid, None, ref,
              [0.2, 0.2, 3.0, 20.0, 0.1, -1.0, -1.0, -1.0], "k3", "token-mean", 0.01, 1.0, -100, 4, "cpu",
              [True, True, False], "counted")
    torch.library.opcheck(torch.ops.rlkernels.linear_policy_loss.default, sample)
    for pieces in ("counted-valid", "device"):
        torch.library.opcheck(torch.ops.rlkernels.linear_policy_loss.default, sample[:-1] + (pieces,))

    @torch.compile(fullgraph=True, backend="eager")
    def step(h, w):
        return rlkernels.linear_ppo_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, beta=0.1,
                                         entropy_coef=0.01, chunk_size=4)[0]

    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = step(h, w)
    loss.backward()
    expected, _ = rlkernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_logprobs=ref, beta=0.1,
                                            entropy_coef=0.01, chunk_size=4)
    (g,) = torch.autograd.grad(expected, hidden)
    scaled_close(loss, expected)
    scaled_close(h.grad, g)


def test_linear_ppo_loss_backward_twice():
    hidden, weight, bias, labels, old, adv, mask, ref = problem(2, 5, 8, 20, torch.float32, "cpu")
    x = hidden.clone().requires_grad_()
    (g,) = torch.autograd.grad(rlkernels.linear_ppo_loss(x, weight, labels, old, adv, mask)[0], x)
    h = hidden.clone().requires_grad_()
    loss, _ = rlkernels.linear_ppo_loss(h, weight, labels, old, adv, mask)
    loss.backward(retain_graph=True)   # grad_loss 1: the stored gradient itself
    (3.0 * loss).backward()            # scaled, out of place
    scaled_close(h.grad, 4.0 * g)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.02])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_ppo_loss_grad_mode_keeps_the_bits(entropy_coef, chunk_size):
    """The op's C++ autograd (gradients wanted) and the plain op (no_grad) give the same
    loss and stats bits; backward hands over the gradients the forward computed, scaled."""
    hidden, weight, bias, labels, old, adv, mask, ref = problem(3, 7, 16, 50, torch.float32, "cpu")
    kw = dict(bias=bias, ref_logprobs=ref, beta=0.05, entropy_coef=entropy_coef, chunk_size=chunk_size)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, stats = rlkernels.linear_ppo_loss(params[0], params[1], labels, old, adv, mask,
                                            **{**kw, "bias": params[2]})
    once = torch.autograd.grad(loss, params, retain_graph=True)
    twice = torch.autograd.grad(loss * 2.0, params)
    for g1, g2 in zip(once, twice):
        assert torch.equal(g1 * 2.0, g2)
    with torch.no_grad():
        plain, plain_stats = rlkernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask, **kw)
    assert torch.equal(loss, plain)
    assert torch.equal(torch.stack(list(stats.values())), torch.stack(list(plain_stats.values())))


@pytest.mark.parametrize("wants", ["none", "hidden", "weight", "both"])
@pytest.mark.parametrize("drop_masked", [False, True], ids=["every-token", "drop-masked"])
def test_linear_ppo_loss_masked_hidden_states_never_leak(wants, drop_masked, monkeypatch):
    """A masked token's hidden state (NaN, inf, anything) changes no bit of the loss, the
    stats or the gradients, whichever gradients are asked for: masked rows reach the
    lm-head matmul in the every-token mode, and grad weight must not see 0 * NaN."""
    if drop_masked:
        monkeypatch.setattr(_lpl, "_EVERY_TOKEN_MACS", -1)
    hidden, weight, _, labels, old, adv, mask, _ = problem(3, 7, 16, 50, torch.float32, "cpu")
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        h = hidden.clone()
        h[~mask] = fill
        params = [h.requires_grad_(wants in ("hidden", "both")), weight.clone().requires_grad_(wants in ("weight", "both"))]
        with torch.set_grad_enabled(wants != "none"):
            loss, stats = rlkernels.linear_ppo_loss(params[0], params[1], labels, old, adv, mask)
            grads = torch.autograd.grad(loss, [p for p in params if p.requires_grad]) if wants != "none" else ()
        results.append((loss, stats, grads))
    (loss0, stats0, grads0) = results[0]
    assert torch.isfinite(loss0)
    for loss, stats, grads in results[1:]:
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
        for name, value in stats0.items():
            torch.testing.assert_close(stats[name], value, rtol=0, atol=0, equal_nan=True)
        assert len(grads) == len(grads0)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=0, atol=0)
