"""Property-based checks (hypothesis) of logprobs and linear_logprobs.  For any shape
(0- and 1-size dims included), memory layout, dtype, temperature, ignored rows holding
NaN/inf, and values from the extremes (huge, tiny, ties, -inf), every backend equals
the float64 reference (values and gradients) within the tolerance table; inputs
outside the contract raise ValueError/TypeError naming the argument.  Budgets: see
tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from property_support import (  # noqa: E402
    KERNEL_FLOATS, backends, budget, check_logits_grad, close, counted, fill, generator, grad_or_zeros, interpreted,
    logits_cases, low_precision_close, poison_where, raises_naming, seeds, temperatures,
)


def _logprobs_truth(logits, labels, entropy, g_lp, g_ent, **kw):
    x = logits.detach().double().requires_grad_()
    out = reference.logprobs(x, labels, entropy=entropy, **kw)
    lp, ent = out if entropy else (out, None)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0)
    grad = grad_or_zeros(loss, x)
    return lp.detach(), (ent.detach() if entropy else None), grad


@backends
def test_logprobs_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(logits_cases(interpreted(backend_device)), st.booleans(), st.booleans())
    @counted
    def check(case, entropy, inplace):
        logits, labels, kw, g = case
        logits, labels = logits.to(device), labels.to(device)
        g_lp = torch.randn(labels.shape, generator=g).to(device)
        g_ent = torch.randn(labels.shape, generator=g).to(device)
        lp_true, ent_true, grad_true = _logprobs_truth(logits, labels, entropy, g_lp, g_ent, **kw)
        leaf = logits.detach().clone() if inplace else logits.detach()
        x = leaf.requires_grad_()
        out = rlkernels.logprobs(x, labels, entropy=entropy, inplace_backward=inplace, backend=backend, **kw)
        lp, ent = out if entropy else (out, None)
        assert lp.dtype == torch.float32 and lp.shape == labels.shape
        close(lp, lp_true, what="logprobs")
        valid = labels != kw["ignore_index"]
        assert bool((lp[~valid] == 0).all())
        if entropy:
            assert ent.dtype == torch.float32 and ent.shape == labels.shape
            close(ent, ent_true, what="entropy")
            assert bool((ent[~valid] == 0).all())
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0)
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, x)
            assert grad.dtype == logits.dtype and grad.shape == logits.shape
            check_logits_grad(grad, grad_true, logits.dtype, "grad logits")

    check()


@st.composite
def linear_cases(draw, tiny: bool):
    lead = draw(st.lists(st.integers(0, 3 if tiny else 6), max_size=2))
    H = draw(st.integers(1, 8 if tiny else 40))
    V = draw(st.integers(1, 24)) if tiny else draw(st.one_of(st.integers(1, 300), st.just(2100)))
    dtype = draw(st.sampled_from(KERNEL_FLOATS))
    g = generator(draw(seeds))
    regime = draw(st.sampled_from(["normal", "wide", "ties"]))
    hidden = fill((*lead, H), g, regime, dtype)
    weight = (fill((V, H), g, "normal", torch.float64) / math.sqrt(H)).to(dtype)
    bias = fill((V,), g, "normal", dtype) if draw(st.booleans()) else None
    ignore_index = draw(st.sampled_from([-100, 0]))
    labels = torch.randint(0, V, tuple(lead), generator=g)
    ignored = torch.rand(tuple(lead), generator=g) < draw(st.sampled_from([0.0, 0.4, 1.0]))
    labels = torch.where(ignored, torch.full_like(labels, ignore_index), labels)
    labels = labels.to(draw(st.sampled_from([torch.int64, torch.int32])))
    hidden = poison_where(hidden, (labels != ignore_index).unsqueeze(-1), draw(st.sampled_from([None, math.nan])))
    N = max(1, math.prod(lead))
    # A 16-bit hidden gradient is rounded once per vocabulary block of the backward
    # (docs/numerics.md), so narrow vocabulary tiles only in float32.
    narrowest = 1 if dtype == torch.float32 else V
    chunk = draw(st.one_of(st.none(), st.integers(1, N + 2),
                           st.tuples(st.integers(1, N + 2), st.integers(narrowest, V + 2))))
    kw = dict(temperature=draw(temperatures), ignore_index=ignore_index, chunk_size=chunk,
              entropy=draw(st.booleans()))
    needs = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    return hidden, weight, bias, labels, kw, needs, g


@backends
def test_linear_logprobs_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(linear_cases(interpreted(backend_device)))
    @counted
    def check(case):
        hidden, weight, bias, labels, kw, needs, g = case
        hidden, weight, labels = hidden.to(device), weight.to(device), labels.to(device)
        bias = bias.to(device) if bias is not None else None
        entropy = kw["entropy"]
        g_lp = torch.randn(labels.shape, generator=g).to(device)
        g_ent = torch.randn(labels.shape, generator=g).to(device)
        ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}

        def run(fn, h, w, b, **extra):
            inputs = [t.detach().clone().requires_grad_(need) if t is not None else None
                      for t, need in zip((h, w, b), needs)]
            out = fn(inputs[0], inputs[1], labels, bias=inputs[2], **extra)
            lp, ent = out if entropy else (out, None)
            loss = (lp * g_lp.to(lp.dtype)).sum() + ((ent * g_ent.to(ent.dtype)).sum() if entropy else 0)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = torch.autograd.grad(loss, wanted) if wanted and loss.requires_grad else ()
            return lp, ent, dict(zip([i for i, t in enumerate(inputs) if t is not None and t.requires_grad], grads))

        as64 = (hidden.double(), weight.double(), bias.double() if bias is not None else None)
        lp_true, ent_true, grads_true = run(reference.linear_logprobs, *as64, **ref_kw)
        lp, ent, grads = run(rlkernels.linear_logprobs, hidden, weight, bias, backend=backend, **kw)
        assert lp.dtype == torch.float32 and lp.shape == labels.shape
        logits = (as64[0] @ as64[1].t() + (as64[2] if bias is not None else 0)).nan_to_num(0.0)
        logit_scale = logits.abs().max().item() / kw["temperature"] if logits.numel() else 0.0
        # The logits are rounded to the input's dtype (also float32: relative 6e-8, which
        # a small temperature amplifies by |z| / T): no worse than PyTorch's unfused lm-head
        lp_same, ent_same, grads_same = run(reference.linear_logprobs, hidden, weight, bias, **ref_kw)
        if hidden.dtype == torch.float32:
            close(lp, lp_true, what="logprobs", same_dtype=lp_same)
            if entropy:
                close(ent, ent_true, what="entropy", same_dtype=ent_same)
        else:
            low_precision_close(lp, lp_same, lp_true, hidden.dtype, logit_scale, what="logprobs")
            if entropy:
                low_precision_close(ent, ent_same, ent_true, hidden.dtype, logit_scale, what="entropy")
        assert set(grads) == set(grads_true)
        for i, grad in grads.items():
            what = ("grad hidden", "grad weight", "grad bias")[i]
            assert grad.dtype == hidden.dtype, what
            if hidden.dtype == torch.float32:
                close(grad, grads_true[i], what=what, elementwise=False, same_dtype=grads_same[i])
            else:
                # one 16-bit rounding of the logits moves p by a relative u |z| / T
                scale = grads_true[i].abs().max().item() if grads_true[i].numel() else 0.0
                low_precision_close(grad, grads_same[i], grads_true[i], hidden.dtype,
                                    scale * max(1.0, logit_scale), what=what)

    check()


# ---- inputs outside the contract --------------------------------------------------------------

LOGPROBS_BAD = ("label_high", "label_negative", "label_float", "label_shape", "logits_int", "logits_0d",
                "temperature_zero", "temperature_negative", "temperature_nan", "temperature_inf", "temperature_str",
                "temperature_bool", "ignore_index_float", "backend", "float64_kernel")


@backends
def test_logprobs_bad_input(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=max(30, len(LOGPROBS_BAD)))
    @given(st.sampled_from(LOGPROBS_BAD), st.integers(1, 4), st.integers(1, 9), st.sampled_from(KERNEL_FLOATS),
           st.sampled_from(["logprobs", "kl_from_logits", "linear_logprobs", "sequence_logprobs"]), seeds)
    @counted
    def check(bad, N, V, dtype, op, seed):
        g = generator(seed)
        logits = fill((N, V), g, "normal", dtype).to(device)
        labels = torch.randint(0, V, (N,), generator=g).to(device)
        kw = dict(temperature=1.0, backend=backend)
        names = ()
        if bad == "label_high":
            labels[-1] = V + int(torch.randint(0, 5, (1,), generator=g))
            names = "labels"
        elif bad == "label_negative":
            labels[0] = -1 if int(torch.randint(0, 2, (1,), generator=g)) else -101
            names = "labels"
        elif bad == "label_float":
            labels = labels.float()
            names = "labels"
        elif bad == "label_shape":
            labels = labels[:-1] if N > 1 else labels.reshape(1, 1)
            names = "labels"
        elif bad == "logits_int":
            logits = labels.unsqueeze(-1).expand(N, V).contiguous()
            names = ("logits", "hidden", "token_logprobs")
        elif bad == "logits_0d":
            logits, labels = logits[0, 0], labels[0]
            names = ("logits", "hidden")
        elif bad.startswith("temperature"):
            kw["temperature"] = {"temperature_zero": 0.0, "temperature_negative": -0.5,
                                 "temperature_nan": math.nan, "temperature_inf": math.inf,
                                 "temperature_str": "1.0", "temperature_bool": True}[bad]
            names = "temperature"
        elif bad == "ignore_index_float":
            kw["ignore_index"] = -100.0
            names = "ignore_index"
        elif bad == "backend":
            kw["backend"] = "gpu"
            names = "backend"
        elif bad == "float64_kernel":
            logits = logits.double()
            names = "backend"
        if op == "logprobs":
            raises_naming(lambda: rlkernels.logprobs(logits, labels, **kw), names)
        elif op == "kl_from_logits":
            if bad.startswith("label") or bad == "ignore_index_float":
                names, ref = "ref_logits", logits[..., :-1] if V > 1 else logits.double()
            else:
                ref = logits
            kw.pop("ignore_index", None)
            raises_naming(lambda: rlkernels.kl_from_logits(logits, ref, **kw), names)
        elif op == "linear_logprobs":
            weight = fill((V, max(V - 1, 1)), g, "normal", dtype).to(device)
            hidden = fill((N, weight.shape[1]), g, "normal", dtype).to(device)
            if bad == "logits_int":
                hidden = hidden.to(torch.int64)
            elif bad == "logits_0d":
                hidden, labels = hidden[0, 0], labels[0] if labels.dim() else labels
            elif bad == "float64_kernel":
                hidden, weight = hidden.double(), weight.double()
            raises_naming(lambda: rlkernels.linear_logprobs(hidden, weight, labels, **kw), names)
        else:  # sequence_logprobs from logits [B, T, V]
            logits3, labels2 = logits.unsqueeze(0), labels.unsqueeze(0) if labels.dim() else labels
            if bad == "logits_0d":
                logits3 = logits
            raises_naming(lambda: rlkernels.sequence_logprobs(logits3, labels=labels2, **kw),
                          names if isinstance(names, tuple) else (names, "logits"))

    check()


# ---- regressions found by the properties above --------------------------------------------------

@backends
def test_regression_empty_rows_in_any_layout(backend_device):
    """Several 0-size leading dims, or a 0-size leading dim with a strided vocabulary,
    used to fail in the kernels' row addressing ("contiguous tensor without a row layout")."""
    backend, device = backend_device
    for shape, step in (((0, 0, 0, 3), 1), ((2, 0, 3), 1), ((0, 2), 2), ((0, 0, 4), 2)):
        full = torch.randn(*shape[:-1], shape[-1] * step, device=device)
        logits = full[..., ::step].requires_grad_()
        labels = torch.zeros(shape[:-1], dtype=torch.int64, device=device)
        lp, ent = rlkernels.logprobs(logits, labels, entropy=True, backend=backend)
        assert lp.shape == shape[:-1] and ent.shape == shape[:-1]
        (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), logits)
        assert grad.shape == logits.shape
        kl = rlkernels.kl_from_logits(logits, logits.detach() + 1, backend=backend)
        assert kl.shape == shape[:-1]
