"""Property-based checks (hypothesis) of linear_ppo_loss: any batch, vocabulary,
chunking, dtype, mask, KL and entropy terms against the float64 reference composed
from logits (loss, statistics and gradients); inputs outside the contract raise
ValueError/TypeError naming the argument.  Budgets: see tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from rlkernels.reference._token_loss import AGG_MODES  # noqa: E402
from rlkernels.reference.policy_loss import KL_ESTIMATORS  # noqa: E402
from property_support import (  # noqa: E402
    KERNEL_FLOATS, as64, backends, budget, check_stats, close, counted, counts, fill, generator, interpreted,
    low_precision_close, poison_where, raises_naming, random_mask, seeds,
)


@st.composite
def linear_ppo_cases(draw, tiny: bool):
    B, T = draw(st.integers(0, 3)), draw(st.integers(0, 4 if tiny else 9))
    H = draw(st.integers(1, 6 if tiny else 24))
    V = draw(st.integers(1, 12 if tiny else 120))
    dtype = draw(st.sampled_from(KERNEL_FLOATS))
    g = generator(draw(seeds))
    hidden = fill((B, T, H), g, "normal", dtype)
    weight = (fill((V, H), g, "normal", torch.float64) / math.sqrt(H)).to(dtype)
    bias = fill((V,), g, "normal", dtype) if draw(st.booleans()) else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels = torch.where(torch.rand(B, T, generator=g) < 0.2, torch.full_like(labels, -100), labels)
    mask = random_mask((B, T), g, draw(st.floats(0.0, 1.0)), empty_row=draw(st.booleans())) if draw(
        st.booleans()) else None
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    adv = fill((B, T) if draw(st.booleans()) else (B,), g, "normal", torch.float64)
    beta = draw(st.sampled_from([0.0, 0.1]))
    ref = old + fill((B, T), g, "normal", torch.float64) * 0.1 if beta else None
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    keep = labels != -100
    if mask is not None:
        keep = keep & mask
    poison = draw(st.sampled_from([None, math.nan]))
    hidden = poison_where(hidden, keep.unsqueeze(-1), poison)
    old = poison_where(old, keep, poison)
    kw = dict(beta=beta, kl=draw(st.sampled_from(KL_ESTIMATORS)), entropy_coef=draw(st.sampled_from([0.0, 0.01, -0.5])),
              temperature=draw(st.floats(0.3, 2.0)), clip_low=draw(st.floats(0.05, 0.5)),
              clip_high=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
              dual_clip=draw(st.one_of(st.none(), st.floats(1.5, 5.0))), agg=draw(st.sampled_from(AGG_MODES)),
              num_tokens=draw(counts), num_seqs=draw(counts), norm_length=draw(counts))
    chunk = draw(st.one_of(st.none(), st.integers(1, max(1, B * T + 1))))
    needs = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    return hidden, weight, bias, labels, mask, old, adv, ref, weights, kw, chunk, needs


@backends
def test_linear_ppo_loss_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(linear_ppo_cases(interpreted(backend_device)))
    @counted
    def check(case):
        hidden, weight, bias, labels, mask, old, adv, ref, weights, kw, chunk, needs = case
        dtype = hidden.dtype

        def run(h, w, b, fp64, **extra):
            cast = (lambda t: None if t is None else (t.double() if fp64 else t.float()).to(device))
            params = [None if t is None else (t.double() if fp64 else t).to(device).requires_grad_(need)
                      for t, need in zip((h, w, b), needs)]
            loss, stats = rlkernels.linear_ppo_loss(params[0], params[1], labels.to(device), cast(old), cast(adv),
                                                    None if mask is None else mask.to(device),
                                                    ref_logprobs=cast(ref), bias=params[2], weights=cast(weights),
                                                    **kw, **extra)
            wanted = [i for i, p in enumerate(params) if p is not None and p.requires_grad]
            grads = torch.autograd.grad(loss, [params[i] for i in wanted]) if wanted and loss.requires_grad else ()
            return loss, stats, dict(zip(wanted, grads))

        loss, stats, grads = run(hidden, weight, bias, False, chunk_size=chunk, backend=backend)
        t_loss, t_stats, t_grads = run(hidden, weight, bias, True, backend="reference")
        assert loss.dtype == torch.float32 and loss.shape == ()
        # PyTorch's composed ops in the input's dtype: the logits rounded as ours are
        s_loss, s_stats, s_grads = run(hidden, weight, bias, False, backend="reference")
        if dtype == torch.float32:
            close(loss, t_loss, what="loss", elementwise=False, same_dtype=s_loss)
            check_stats(stats, t_stats, dtype, same_dtype=s_stats)
        else:
            # The logits are rounded to 16 bits (how well: test_linear_logprobs_property).
            # Given the log-probs linear_logprobs computes, the rest is float32 arithmetic:
            # the float64 ppo_loss of those log-probs is the truth.
            with_entropy = kw["entropy_coef"] != 0.0
            ours = rlkernels.linear_logprobs(hidden.to(device), weight.to(device), labels.to(device),
                                             bias=None if bias is None else bias.to(device), entropy=with_entropy,
                                             temperature=kw["temperature"], backend=backend)
            lp, ent = ours if with_entropy else (ours, None)
            valid = (labels != -100) & (mask if mask is not None else True)
            policy_kw = {k: v for k, v in kw.items() if k not in ("beta", "kl", "entropy_coef", "temperature")}
            expected, _ = reference.ppo_loss(lp.double().cpu(), old.double(), adv.double(), valid,
                                             weights=as64(weights), ref_logprobs=as64(ref) if kw["beta"] else None,
                                             kl_coef=kw["beta"], kl=kw["kl"], **policy_kw)
            if with_entropy:
                from rlkernels.reference._token_loss import aggregate
                entropy = torch.where(valid, ent.double().cpu(), 0)
                expected = expected - kw["entropy_coef"] * aggregate(
                    entropy, valid, kw["agg"], num_tokens=kw["num_tokens"], num_seqs=kw["num_seqs"],
                    norm_length=kw["norm_length"])
            close(loss, expected, what="loss", elementwise=False)
        assert set(grads) == set(t_grads)
        # one 16-bit rounding of the logits moves p by a relative u |z| / T: so much the
        # gradients may move too
        logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
        sensitivity = max(1.0, logits.nan_to_num(0.0).abs().max().item() / kw["temperature"]) if logits.numel() else 1.0
        for i, grad in grads.items():
            what = ("grad hidden", "grad weight", "grad bias")[i]
            assert grad.dtype == dtype, what
            if dtype == torch.float32:
                close(grad, t_grads[i], what=what, elementwise=False, same_dtype=s_grads[i])
            else:
                scale = t_grads[i].abs().max().item() if t_grads[i].numel() else 0.0
                low_precision_close(grad, s_grads[i], t_grads[i], dtype, scale * sensitivity, what=what)

    check()


LINEAR_PPO_BAD = ("label_high", "labels_float", "labels_shape", "weight_shape", "bias_shape", "hidden_2d", "chunk_zero",
                  "chunk_float", "entropy_coef_nan", "beta_without_ref", "kl", "temperature_zero", "ignore_index_str",
                  "mask_values", "old_shape")


@backends
def test_linear_ppo_loss_bad_input(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=max(30, 2 * len(LINEAR_PPO_BAD)))
    @given(st.sampled_from(LINEAR_PPO_BAD), st.integers(1, 2), st.integers(1, 3), seeds)
    @counted
    def check(bad, B, T, seed):
        g = generator(seed)
        H, V = 4, 6
        hidden, weight = fill((B, T, H), g).to(device), fill((V, H), g).to(device)
        labels = torch.randint(0, V, (B, T), generator=g).to(device)
        old, adv = fill((B, T), g).to(device), fill((B, T), g).to(device)
        mask, kw = None, dict(backend=backend)
        names = bad.rsplit("_", 1)[0] if bad.endswith(("_zero", "_nan", "_str", "_float", "_shape", "_2d",
                                                        "_values", "_high")) else bad
        if bad == "label_high":
            labels[0, 0], names = V, "labels"
        elif bad == "labels_float":
            labels = labels.float()
        elif bad == "labels_shape":
            labels = labels[:, :-1] if T > 1 else labels.reshape(B, 1, 1)
        elif bad == "weight_shape":
            weight = weight[:, :-1]
        elif bad == "bias_shape":
            kw["bias"] = torch.zeros(V + 1, device=device)
        elif bad == "hidden_2d":
            hidden, names = hidden[0], "hidden"
        elif bad in ("chunk_zero", "chunk_float"):
            kw["chunk_size"], names = (0 if bad == "chunk_zero" else 2.0), "chunk_size"
        elif bad == "entropy_coef_nan":
            kw["entropy_coef"] = math.nan
        elif bad == "beta_without_ref":
            kw["beta"], names = 0.1, "ref_logprobs"
        elif bad == "kl":
            kw["kl"] = "k4"
        elif bad == "temperature_zero":
            kw["temperature"] = 0.0
        elif bad == "ignore_index_str":
            kw["ignore_index"] = "-100"
        elif bad == "mask_values":
            mask = torch.full((B, T), 5, device=device)
        elif bad == "old_shape":
            old, names = old[:, :1].repeat(1, T + 1), "old_logprobs"
        raises_naming(lambda: rlkernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask, **kw), names)

    check()


@backends
@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_regression_linear_ppo_loss_empty_batch_gradient(backend_device, shape):
    """On an empty batch the (empty) hidden gradient was dropped, so autograd reported
    hidden as unused."""
    backend, device = backend_device
    hidden = torch.randn(*shape, 5, device=device, requires_grad=True)
    weight = torch.randn(7, 5, device=device, requires_grad=True)
    labels = torch.zeros(shape, dtype=torch.int64, device=device)
    loss, _ = rlkernels.linear_ppo_loss(hidden, weight, labels, torch.zeros(shape, device=device),
                                        torch.zeros(shape, device=device), backend=backend)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    assert grad_hidden.shape == hidden.shape and grad_weight.shape == weight.shape
    assert float(loss) == 0.0 and not bool(grad_weight.any())
