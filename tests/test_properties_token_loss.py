"""Property-based checks (hypothesis) of the token losses: ppo_loss, grpo_loss and
value_loss.  For any batch shape (empty batches, rows and masks included), dtype,
mask with empty rows and NaN/inf in masked slots, clip settings, aggregation mode
and normaliser, every backend equals the float64 reference (loss, statistics and
gradients) within the tolerance table; inputs outside the contract raise
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
from rlkernels.reference.policy_loss import GRPO_LOSS_TYPES, KL_ESTIMATORS  # noqa: E402
from property_support import (  # noqa: E402
    as64, backends, budget, check_grad, check_stats, close, computed_in, counted, counts, fill, generator,
    grad_or_zeros, interpreted, masked_inputs, raises_naming, seeds, token_batches,
)


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
        grad = grad_or_zeros(loss, x)
        xt = lp.double().requires_grad_()
        adv_t = adv.double().reshape(B) if adv_shape == "row1" and T != 1 else adv.double()
        t_loss, t_stats = reference.ppo_loss(xt, old.double(), adv_t, mask, weights=as64(weights),
                                             log_ratio_clamp=None if log_ratio_clamp == math.inf else log_ratio_clamp,
                                             **{k: v for k, v in kw.items() if k != "log_ratio_clamp"})
        t_grad = grad_or_zeros(t_loss, xt)
        assert loss.shape == () and loss.dtype == computed_in(dtype)
        # Without a log-ratio clamp exp(log ratio) may overflow float32 where float64
        # does not: PyTorch in the arithmetic's dtype says what that dtype can hold.
        acc = computed_in(dtype)
        xs = lp.to(acc).requires_grad_()
        s_loss, s_stats = reference.ppo_loss(xs, old.to(acc), adv_t.to(acc), mask,
                                             weights=None if weights is None else weights.to(acc),
                                             log_ratio_clamp=None if log_ratio_clamp == math.inf else log_ratio_clamp,
                                             **{k: v for k, v in kw.items() if k != "log_ratio_clamp"})
        s_grad = grad_or_zeros(s_loss, xs)
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
        grad = grad_or_zeros(loss, x)
        xt = lp.double().requires_grad_()
        t_loss, t_stats = reference.grpo_loss(xt, as64(old), adv.double(), mask, ref_logprobs=as64(ref), **kw)
        t_grad = grad_or_zeros(t_loss, xt)
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
        grad = grad_or_zeros(loss, x)
        xt = values.double().requires_grad_()
        t_loss, t_stats = reference.value_loss(xt, as64(old), returns.double(), mask, **kw)
        t_grad = grad_or_zeros(t_loss, xt)
        # which of the two clipped terms is larger may be decided by float32 rounding
        acc = computed_in(dtype)
        xs = values.to(acc).requires_grad_()
        s_loss, s_stats = reference.value_loss(xs, None if old is None else old.to(acc), returns.to(acc), mask, **kw)
        s_grad = grad_or_zeros(s_loss, xs)
        assert loss.shape == () and loss.dtype == acc
        close(loss, t_loss, computed_in=acc, what="loss", elementwise=False, same_dtype=s_loss)
        check_grad(grad, t_grad, dtype, "grad values", same_dtype=s_grad)
        check_stats(stats, t_stats, dtype, same_dtype=s_stats)

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
