"""Property-based checks (hypothesis) of dpo_loss, sequence_logprobs and
dpo_sequence_loss (the two fused): any batch,
dtype, loss kind, label smoothing and mask against the float64 reference, values and
gradients; inputs outside the contract raise ValueError/TypeError naming the
argument.  Budgets: see tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from rlkernels.reference.preference import PREFERENCE_KINDS  # noqa: E402
from property_support import (  # noqa: E402
    KERNEL_FLOATS, LOSS_FLOATS, backends, budget, check_grad, close, computed_in, counted, fill, generator,
    interpreted, masked_inputs, poison_where, raises_naming, random_mask, rounded_close, seeds, token_batches,
)


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


@backends
def test_dpo_sequence_loss_property(backend_device):
    """The fused step against the composition sequence_logprobs + dpo_loss in float64:
    any [2B, T] batch and mask (empty rows, poisoned masked slots, float masks), dtype,
    kind, smoothing, beta and average; values and both gradients."""
    backend, device = backend_device

    @budget(backend_device)
    @given(token_batches(interpreted(backend_device)), st.sampled_from(PREFERENCE_KINDS), st.floats(1e-3, 10.0),
           st.floats(0.0, 0.49), st.booleans(), st.sampled_from(["normal", "wide"]))
    @counted
    def check(batch, kind, beta, smoothing, average, regime):
        B, T, dtype, mask, poison, g = batch
        ls = smoothing if kind in ("sigmoid", "robust") else 0.0
        if mask is not None:
            mask = torch.cat([mask, mask.flip(0)])  # [2B, T]: the rejected rows' masks in another order
        policy = (-fill((2 * B, T), g, regime, torch.float64).abs()).to(dtype)
        ref = (policy.double() + 0.3 * torch.randn(2 * B, T, generator=g, dtype=torch.float64)).to(dtype)
        policy, ref = masked_inputs([policy, ref], mask, poison)
        kw = dict(beta=beta, kind=kind, label_smoothing=ls, average=average)
        x, r = policy.to(device).requires_grad_(), ref.to(device).requires_grad_()
        outs = rlkernels.dpo_sequence_loss(x, r, None if mask is None else mask.to(device), backend=backend, **kw)
        xt, rt = policy.double().requires_grad_(), ref.double().requires_grad_()
        truth = reference.dpo_sequence_loss(xt, rt, mask, **kw)
        acc = computed_in(dtype)
        xs, rs = policy.to(acc).requires_grad_(), ref.to(acc).requires_grad_()
        same = reference.dpo_sequence_loss(xs, rs, mask, **kw)
        for ours, want, s_want, name in zip(outs, truth, same, ("losses", "chosen_rewards", "rejected_rewards")):
            assert ours.shape == (B,) and ours.dtype == acc, name
            close(ours, want, computed_in=acc, what=name, elementwise=False, same_dtype=s_want)
        if not (B and T):
            return
        weights = torch.randn(B, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((outs[0] * weights.to(device, acc)).sum(), (x, r))
        t_grads = torch.autograd.grad((truth[0] * weights).sum(), (xt, rt))
        s_grads = torch.autograd.grad((same[0] * weights.to(acc)).sum(), (xs, rs))
        for ours, want, s_want, name in zip(grads, t_grads, s_grads, ("grad policy", "grad ref")):
            check_grad(ours, want, dtype, name, same_dtype=s_want.to(dtype))

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
