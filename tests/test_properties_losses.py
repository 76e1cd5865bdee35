"""Property-based checks (hypothesis) of the losses: ppo_loss, grpo_loss, value_loss,
dpo_loss, sequence_logprobs and linear_ppo_loss.  For any batch shape (empty batches,
rows and masks included), dtype, mask with empty rows and NaN/inf in masked slots,
clip settings, aggregation mode and normaliser, every backend equals the float64
reference (loss, statistics and gradients) within the tolerance table; inputs outside
the contract raise ValueError/TypeError naming the argument.  Budgets: see
tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from rlkernels.reference._token_loss import AGG_MODES  # noqa: E402
from rlkernels.reference.policy_loss import GRPO_LOSS_TYPES, KL_ESTIMATORS  # noqa: E402
from rlkernels.reference.preference import PREFERENCE_KINDS  # noqa: E402
from property_support import (  # noqa: E402
    counted,
    KERNEL_FLOATS, LOSS_FLOATS, backends, budget, close, fill, generator, interpreted, low_precision_close,
    poison_where, raises_naming,
    random_mask, rounded_close, seeds,
)

poisons = st.sampled_from([None, math.nan, math.inf, -math.inf])
counts = st.one_of(st.none(), st.floats(0.5, 500.0))


def computed_in(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_grad(ours, truth, dtype, what, same_dtype=None):
    assert ours.dtype == dtype, what
    if dtype in (torch.float32, torch.float64):
        close(ours, truth, computed_in=dtype, what=what, elementwise=False, same_dtype=same_dtype)
    else:
        rounded_close(ours, truth, dtype, what=what, same_dtype=same_dtype)


def check_stats(stats, truth, dtype, same_dtype=None):
    assert set(stats) >= set(truth), set(truth) - set(stats)
    for name, value in truth.items():
        close(stats[name], value, computed_in=computed_in(dtype), what=name, elementwise=False,
              same_dtype=None if same_dtype is None else same_dtype[name])


@st.composite
def token_batches(draw, tiny: bool):
    """[B, T] shape (long rows cross the CPU kernels' 512-token chunks), dtype, mask
    (None, random with empty rows, or all False), poison for masked slots, generator."""
    B = draw(st.integers(0, 3 if tiny else 7))
    T = draw(st.integers(0, 6)) if tiny else draw(st.one_of(st.integers(0, 40), st.sampled_from([512, 513, 1100])))
    dtype = draw(st.sampled_from(LOSS_FLOATS))
    g = generator(draw(seeds))
    kind = draw(st.sampled_from(["none", "random", "random", "empty"]))
    mask = None
    if kind == "random":
        mask = random_mask((B, T), g, draw(st.floats(0.0, 1.0)), empty_row=draw(st.booleans()))
    elif kind == "empty":
        mask = torch.zeros(B, T, dtype=torch.bool)
    if mask is not None and draw(st.booleans()):
        mask = mask.to(draw(st.sampled_from([torch.float32, torch.int64, torch.uint8])))
    return B, T, dtype, mask, draw(poisons), g


def masked_inputs(tensors, mask, poison):
    if mask is None or poison is None:
        return tensors
    keep = mask.bool()
    return [None if t is None else poison_where(t, keep if t.shape == keep.shape else keep.any(-1), poison)
            for t in tensors]


def as64(t):
    return None if t is None else t.double()


@backends
def test_ppo_loss_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(token_batches(interpreted(backend_device)), st.sampled_from([0.0, 0.1, 1.0, 30.0]),
           st.sampled_from(["token", "row", "row1"]), st.booleans(), st.floats(0.01, 0.99),
           st.one_of(st.none(), st.floats(0.01, 5.0)), st.one_of(st.none(), st.floats(1.01, 10.0)),
           st.one_of(st.none(), st.just(math.inf), st.floats(0.1, 30.0)), st.sampled_from(AGG_MODES),
           counts, counts, counts)
    @counted
    def check(batch, spread, adv_shape, with_weights, clip_low, clip_high, dual_clip, log_ratio_clamp, agg,
              num_tokens, num_seqs, norm_length):
        B, T, dtype, mask, poison, g = batch
        lp = -fill((B, T), g, "normal", torch.float64).abs()
        old = lp + fill((B, T), g, "normal", torch.float64) * spread
        adv = fill({"token": (B, T), "row": (B,), "row1": (B, 1)}[adv_shape], g, "normal", torch.float64)
        weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 if with_weights else None
        lp, old, adv, weights = (None if t is None else t.to(dtype) for t in (lp, old, adv, weights))
        if adv_shape == "token":
            lp, old, adv, weights = masked_inputs([lp, old, adv, weights], mask, poison)
        else:
            lp, old, weights = masked_inputs([lp, old, weights], mask, poison)
        kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp,
                  agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
        to = (lambda t: None if t is None else t.to(device))
        x = lp.to(device).requires_grad_()
        loss, stats = rlkernels.ppo_loss(x, to(old), to(adv), to(mask), weights=to(weights), backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
        xt = lp.double().requires_grad_()
        adv_t = adv.double().reshape(B) if adv_shape == "row1" and T != 1 else adv.double()
        t_loss, t_stats = reference.ppo_loss(xt, old.double(), adv_t, mask, weights=as64(weights),
                                             log_ratio_clamp=None if log_ratio_clamp == math.inf else log_ratio_clamp,
                                             **{k: v for k, v in kw.items() if k != "log_ratio_clamp"})
        (t_grad,) = torch.autograd.grad(t_loss, xt) if t_loss.requires_grad else (torch.zeros_like(xt),)
        assert loss.shape == () and loss.dtype == computed_in(dtype)
        # Without a log-ratio clamp exp(log ratio) may overflow float32 where float64
        # does not: PyTorch in the arithmetic's dtype says what that dtype can hold.
        acc = computed_in(dtype)
        xs = lp.to(acc).requires_grad_()
        s_loss, s_stats = reference.ppo_loss(xs, old.to(acc), adv_t.to(acc), mask,
                                             weights=None if weights is None else weights.to(acc),
                                             log_ratio_clamp=None if log_ratio_clamp == math.inf else log_ratio_clamp,
                                             **{k: v for k, v in kw.items() if k != "log_ratio_clamp"})
        (s_grad,) = torch.autograd.grad(s_loss, xs) if s_loss.requires_grad else (torch.zeros_like(xs),)
        close(loss, t_loss, computed_in=acc, what="loss", elementwise=False, same_dtype=s_loss)
        if log_ratio_clamp in (None, math.inf):
            # The kernel stores each token's gradient before the aggregation's scale
            # (docs/losses.md): A * ratio overflows float32 once the log ratio nears 88,
            # even where the scaled gradient would fit (docs/numerics.md).
            near_overflow = ((lp.double() - old.double()).abs() > 80).to(device)
            grad, t_grad, s_grad = (torch.where(near_overflow, 0, t) for t in (grad, t_grad, s_grad))
        check_grad(grad, t_grad, dtype, "grad logprobs", same_dtype=s_grad)
        check_stats(stats, t_stats, dtype, same_dtype=s_stats)

    check()


@backends
def test_grpo_loss_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(token_batches(interpreted(backend_device)), st.booleans(), st.sampled_from(["token", "row"]),
           st.sampled_from([0.0, 0.0, 0.04, 1.0]), st.sampled_from(KL_ESTIMATORS), st.sampled_from(GRPO_LOSS_TYPES),
           st.floats(0.01, 0.99), st.one_of(st.none(), st.floats(0.01, 5.0)),
           st.one_of(st.none(), st.integers(1, 50)), counts, counts, st.one_of(st.none(), st.floats(0.1, 30.0)))
    @counted
    def check(batch, on_policy, adv_shape, beta, kl, loss_type, clip_low, clip_high, max_len, num_tokens, num_seqs,
              log_ratio_clamp):
        B, T, dtype, mask, poison, g = batch
        lp = -fill((B, T), g, "normal", torch.float64).abs()
        old = None if on_policy else lp + fill((B, T), g, "normal", torch.float64) * 0.5
        ref = lp + fill((B, T), g, "wide", torch.float64) * 0.1 if beta > 0 else None
        adv = fill((B, T) if adv_shape == "token" else (B,), g, "normal", torch.float64)
        lp, old, ref, adv = (None if t is None else t.to(dtype) for t in (lp, old, ref, adv))
        lp, old, ref = masked_inputs([lp, old, ref], mask, poison)
        kw = dict(beta=beta, kl=kl, loss_type=loss_type, clip_low=clip_low, clip_high=clip_high,
                  max_completion_length=max_len, num_tokens=num_tokens, num_seqs=num_seqs,
                  log_ratio_clamp=log_ratio_clamp)
        to = (lambda t: None if t is None else t.to(device))
        x = lp.to(device).requires_grad_()
        loss, stats = rlkernels.grpo_loss(x, to(old), to(adv), to(mask), ref_logprobs=to(ref), backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
        xt = lp.double().requires_grad_()
        t_loss, t_stats = reference.grpo_loss(xt, as64(old), adv.double(), mask, ref_logprobs=as64(ref), **kw)
        (t_grad,) = torch.autograd.grad(t_loss, xt) if t_loss.requires_grad else (torch.zeros_like(xt),)
        close(loss, t_loss, computed_in=computed_in(dtype), what="loss", elementwise=False)
        check_grad(grad, t_grad, dtype, "grad logprobs")
        check_stats(stats, t_stats, dtype)

    check()


@backends
def test_value_loss_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(token_batches(interpreted(backend_device)), st.one_of(st.none(), st.floats(1e-3, 10.0)), st.booleans(),
           st.sampled_from(AGG_MODES), st.sampled_from(["normal", "wide", "huge", "tiny"]), counts, counts, counts)
    @counted
    def check(batch, clip, with_old, agg, regime, num_tokens, num_seqs, norm_length):
        B, T, dtype, mask, poison, g = batch
        values = fill((B, T), g, regime, dtype)
        old = (values.double() + fill((B, T), g, "normal", torch.float64)).to(dtype) if with_old or clip else None
        returns = fill((B, T), g, regime, dtype)
        values, old, returns = masked_inputs([values, old, returns], mask, poison)
        kw = dict(clip=clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
        to = (lambda t: None if t is None else t.to(device))
        x = values.to(device).requires_grad_()
        loss, stats = rlkernels.value_loss(x, to(old), to(returns), to(mask), backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
        xt = values.double().requires_grad_()
        t_loss, t_stats = reference.value_loss(xt, as64(old), returns.double(), mask, **kw)
        (t_grad,) = torch.autograd.grad(t_loss, xt) if t_loss.requires_grad else (torch.zeros_like(xt),)
        # which of the two clipped terms is larger may be decided by float32 rounding
        acc = computed_in(dtype)
        xs = values.to(acc).requires_grad_()
        s_loss, s_stats = reference.value_loss(xs, None if old is None else old.to(acc), returns.to(acc), mask, **kw)
        (s_grad,) = torch.autograd.grad(s_loss, xs) if s_loss.requires_grad else (torch.zeros_like(xs),)
        assert loss.shape == () and loss.dtype == acc
        close(loss, t_loss, computed_in=acc, what="loss", elementwise=False, same_dtype=s_loss)
        check_grad(grad, t_grad, dtype, "grad values", same_dtype=s_grad)
        check_stats(stats, t_stats, dtype, same_dtype=s_stats)

    check()


@backends
def test_dpo_loss_property(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device)
    @given(st.integers(0, 4 if tiny else 40), st.tuples(*[st.sampled_from(LOSS_FLOATS)] * 4),
           st.sampled_from(PREFERENCE_KINDS), st.one_of(st.sampled_from([0.1, 1e-3, 100.0]), st.floats(1e-3, 50.0)),
           st.floats(0.0, 0.5), st.sampled_from(["normal", "wide", "huge", "tiny"]), seeds)
    @counted
    def check(B, dtypes, kind, beta, smoothing, regime, seed):
        g = generator(seed)
        ls = {"sigmoid": smoothing, "robust": min(smoothing, 0.49), "hinge": 0.0, "ipo": 0.0}[kind]
        inputs = [(-fill((B,), g, regime, torch.float64).abs()).to(d) for d in dtypes]
        xs = [t.to(device).requires_grad_() for t in inputs]
        losses, chosen, rejected = rlkernels.dpo_loss(*xs, beta=beta, kind=kind, label_smoothing=ls, backend=backend)
        xts = [t.double().requires_grad_() for t in inputs]
        t_losses, t_chosen, t_rejected = reference.dpo_loss(*xts, beta=beta, kind=kind, label_smoothing=ls)
        common = dtypes[0]
        for d in dtypes[1:]:
            common = torch.promote_types(common, d)
        acc = computed_in(common)
        assert losses.dtype == acc and losses.shape == (B,)
        # z is a difference of four log-probs: with huge ones float32 cannot hold it exactly
        s_losses, s_chosen, s_rejected = reference.dpo_loss(*[t.to(acc) for t in inputs], beta=beta, kind=kind,
                                                            label_smoothing=ls)
        close(losses, t_losses, computed_in=acc, what="losses", same_dtype=s_losses)
        close(chosen, t_chosen, computed_in=acc, what="chosen_rewards", same_dtype=s_chosen)
        close(rejected, t_rejected, computed_in=acc, what="rejected_rewards", same_dtype=s_rejected)
        weights = torch.randn(B, generator=g, dtype=torch.float64)
        if not B:
            return
        grads = torch.autograd.grad((losses * weights.to(device, acc)).sum(), xs)
        t_grads = torch.autograd.grad((t_losses * weights).sum(), xts)
        xss = [t.to(acc).requires_grad_() for t in inputs]
        s_losses = reference.dpo_loss(*xss, beta=beta, kind=kind, label_smoothing=ls)[0]
        s_grads = torch.autograd.grad((s_losses * weights.to(acc)).sum(), xss)
        for ours, truth, same, d, name in zip(grads, t_grads, s_grads, dtypes, ("pc", "pr", "rc", "rr")):
            # the gradient is computed in `acc` and written in the input's dtype
            if d in (torch.float32, torch.float64):
                close(ours, truth, computed_in=d if acc == torch.float64 else acc, what=f"grad {name}",
                      elementwise=False, same_dtype=same)
            else:
                rounded_close(ours, truth, d, what=f"grad {name}", same_dtype=same)

    check()


@backends
def test_sequence_logprobs_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(token_batches(interpreted(backend_device)), st.booleans(), st.sampled_from(["normal", "wide", "huge"]))
    @counted
    def check(batch, average, regime):
        B, T, dtype, mask, poison, g = batch
        lp = (-fill((B, T), g, regime, torch.float64).abs()).to(dtype)
        (lp,) = masked_inputs([lp], mask, poison)
        x = lp.to(device).requires_grad_()
        out = rlkernels.sequence_logprobs(x, None if mask is None else mask.to(device), average=average,
                                          backend=backend)
        xt = lp.double().requires_grad_()
        truth = reference.sequence_logprobs(xt, mask, average=average)
        assert out.shape == (B,) and out.dtype == computed_in(dtype)
        close(out, truth, computed_in=computed_in(dtype), what="sums", elementwise=False)
        weights = torch.randn(B, generator=g, dtype=torch.float64)
        if B and T:
            (grad,) = torch.autograd.grad((out * weights.to(device, out.dtype)).sum(), x)
            (t_grad,) = torch.autograd.grad((truth * weights).sum(), xt)
            check_grad(grad, t_grad, dtype, "grad")

    check()


@backends
def test_sequence_logprobs_from_logits_property(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device)
    @given(st.integers(0, 3), st.integers(0, 5 if tiny else 12), st.integers(1, 8 if tiny else 200),
           st.sampled_from(KERNEL_FLOATS), st.booleans(), st.booleans(), st.floats(0.1, 3.0), seeds)
    @counted
    def check(B, T, V, dtype, average, with_mask, temperature, seed):
        g = generator(seed)
        logits = fill((B, T, V), g, "wide", dtype)
        labels = torch.randint(0, V, (B, T), generator=g)
        labels = torch.where(torch.rand(B, T, generator=g) < 0.3, torch.full_like(labels, -100), labels)
        mask = random_mask((B, T), g, 0.7) if with_mask else None
        logits = poison_where(logits, (labels != -100).unsqueeze(-1), math.nan)
        x = logits.to(device).requires_grad_()
        out = rlkernels.sequence_logprobs(x, None if mask is None else mask.to(device), labels=labels.to(device),
                                          average=average, temperature=temperature, backend=backend)
        xt = logits.double().requires_grad_()
        token = reference.logprobs(xt, labels, temperature=temperature)
        valid = (labels != -100) & (mask if mask is not None else True)
        truth = reference.sequence_logprobs(token, valid, average=average)
        close(out, truth, what="sums", elementwise=False)
        if B:
            weights = torch.randn(B, generator=g)
            (grad,) = torch.autograd.grad((out * weights.to(device)).sum(), x)
            (t_grad,) = torch.autograd.grad((truth * weights.double()).sum(), xt)
            check_grad(grad, t_grad, dtype, "grad logits")

    check()


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


# ---- inputs outside the contract --------------------------------------------------------------

TOKEN_BAD = ("mask_values", "mask_shape", "mask_complex", "old_shape", "adv_shape", "lp_1d", "lp_int", "weights_int",
             "clip_low_zero", "clip_low_one", "clip_high_negative", "dual_clip_one", "agg", "num_tokens_zero",
             "num_seqs_negative", "norm_length_nan", "log_ratio_clamp_zero", "backend", "not_tensor")


@backends
def test_token_losses_bad_input(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=max(40, 2 * len(TOKEN_BAD)))
    @given(st.sampled_from(TOKEN_BAD), st.sampled_from(["ppo", "grpo", "value"]), st.integers(1, 3),
           st.integers(1, 5), seeds)
    @counted
    def check(bad, op, B, T, seed):
        g = generator(seed)
        lp, old, adv = (fill((B, T), g).to(device) for _ in range(3))
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        kw, weights = {}, None
        if bad == "mask_values":
            mask, names = torch.full((B, T), 2.0, device=device), "mask"
        elif bad == "mask_shape":
            mask, names = mask[:, :-1] if T > 1 else mask.reshape(-1, 1, T), "mask"
        elif bad == "mask_complex":
            mask, names = torch.ones(B, T, dtype=torch.complex64, device=device), "mask"
        elif bad == "old_shape":
            old, names = torch.cat([old, old], 1), ("old_logprobs", "old_values")
        elif bad == "adv_shape":
            adv, names = adv[:, :1].repeat(1, T + 1), ("advantages", "returns")
        elif bad == "lp_1d":
            lp, names = lp.reshape(-1), ("logprobs", "values")
        elif bad == "lp_int":
            lp, names = lp.to(torch.int64), ("logprobs", "values")
        elif bad == "weights_int":
            weights, names = torch.ones(B, T, dtype=torch.int64, device=device), "weights"
        elif bad == "not_tensor":
            adv, names = adv.tolist(), ("advantages", "returns")
        else:  # a bad option
            option, value = {"clip_low_zero": ("clip_low", 0.0), "clip_low_one": ("clip_low", 1.0),
                             "clip_high_negative": ("clip_high", -0.1), "dual_clip_one": ("dual_clip", 1.0),
                             "agg": ("agg", "mean"), "num_tokens_zero": ("num_tokens", 0.0),
                             "num_seqs_negative": ("num_seqs", -2.0), "norm_length_nan": ("norm_length", math.nan),
                             "log_ratio_clamp_zero": ("log_ratio_clamp", 0.0), "backend": ("backend", "tpu")}[bad]
            # the same mistake in each op's own vocabulary
            if op == "grpo":
                option, value = {"dual_clip": ("clip_low", 0.0), "agg": ("loss_type", "mean"),
                                 "norm_length": ("max_completion_length", 0)}.get(option, (option, value))
            elif op == "value" and option in ("clip_low", "clip_high", "dual_clip", "log_ratio_clamp"):
                option, value = "clip", -abs(value) if value else 0.0
            kw[option], names = value, option
        kw.setdefault("backend", backend)
        if op == "ppo":
            raises_naming(lambda: rlkernels.ppo_loss(lp, old, adv, mask, weights=weights, **kw), names)
        elif op == "grpo":
            if weights is not None:  # grpo has no weights: an integer ref_logprobs instead
                kw.update(ref_logprobs=weights, beta=0.1)
                names = "ref_logprobs"
            raises_naming(lambda: rlkernels.grpo_loss(lp, old, adv, mask, **kw), names)
        else:
            if weights is not None:  # value_loss has no weights: integer returns instead
                adv, names = adv.to(torch.int32), "returns"
            raises_naming(lambda: rlkernels.value_loss(lp, old, adv, mask, **kw), names)

    check()


DPO_BAD = ("beta_zero", "beta_nan", "kind", "ls_hinge", "ls_robust_half", "ls_negative", "shape", "ndim", "int",
           "backend")


@backends
def test_dpo_and_sequence_bad_input(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=30)
    @given(st.sampled_from(DPO_BAD), st.integers(1, 4), seeds)
    @counted
    def check(bad, B, seed):
        g = generator(seed)
        pc, pr, rc, rr = (fill((B,), g).to(device) for _ in range(4))
        kw = dict(beta=0.1, kind="sigmoid", label_smoothing=0.0, backend=backend)
        names = bad.split("_")[0]
        if bad == "beta_zero":
            kw["beta"] = 0.0
        elif bad == "beta_nan":
            kw["beta"] = math.nan
        elif bad == "kind":
            kw["kind"] = "kto"
        elif bad == "ls_hinge":
            kw.update(kind="hinge", label_smoothing=0.1)
            names = "label_smoothing"
        elif bad == "ls_robust_half":
            kw.update(kind="robust", label_smoothing=0.5)
            names = "label_smoothing"
        elif bad == "ls_negative":
            kw["label_smoothing"], names = -0.1, "label_smoothing"
        elif bad == "shape":
            rr, names = torch.cat([rr, rr]), "ref_rejected"
        elif bad == "ndim":
            pc, pr, rc, rr = (t.reshape(B, 1) for t in (pc, pr, rc, rr))
            names = "policy_chosen"
        elif bad == "int":
            pr, names = pr.to(torch.int64), "policy_rejected"
        elif bad == "backend":
            kw["backend"] = "xla"
        raises_naming(lambda: rlkernels.dpo_loss(pc, pr, rc, rr, **kw), names)
        # sequence_logprobs: a bad mask, a non-bool average, 1-D token log-probs
        tokens = fill((B, 3), g).to(device)
        raises_naming(lambda: rlkernels.sequence_logprobs(tokens, torch.full((B, 3), 3, device=device),
                                                          backend=backend), "mask")
        raises_naming(lambda: rlkernels.sequence_logprobs(tokens, average=1, backend=backend), "average")
        raises_naming(lambda: rlkernels.sequence_logprobs(tokens[0], backend=backend), "token_logprobs")

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


# ---- regressions found by the properties above --------------------------------------------------

@backends
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_regression_grpo_empty_batch(backend_device, loss_type, shape):
    """grpo/dr_grpo normalise by B (and T): on an empty batch these became a num_seqs /
    norm_length of 0 that the validation then rejected, naming arguments the caller never
    passed.  An empty batch has loss 0 and a zero gradient."""
    backend, device = backend_device
    lp = torch.zeros(shape, device=device, requires_grad=True)
    loss, stats = rlkernels.grpo_loss(lp, None, torch.zeros(shape[0], device=device), loss_type=loss_type,
                                      backend=backend)
    assert float(loss) == 0.0 and float(stats["num_tokens"]) == 0.0
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True, materialize_grads=True)
    assert grad.shape == shape and not bool(grad.any())


@backends
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_regression_grpo_checks_counts_it_does_not_use(backend_device, loss_type):
    """num_tokens / num_seqs were dropped unchecked by the loss types that do not use
    them: an invalid count (0, negative, NaN) is a bug upstream and must say so."""
    backend, device = backend_device
    lp = torch.zeros(2, 3, device=device)
    for name, value in (("num_tokens", 0.0), ("num_seqs", -1.0), ("num_tokens", math.nan)):
        raises_naming(lambda: rlkernels.grpo_loss(lp, None, torch.zeros(2, device=device), loss_type=loss_type,
                                                  backend=backend, **{name: value}), name)


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
