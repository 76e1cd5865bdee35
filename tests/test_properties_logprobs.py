"""Property-based checks (hypothesis) of the ops over logits: logprobs, kl_from_logits,
kl_penalty and linear_logprobs.  For any shape (0- and 1-size dims included), memory
layout, dtype, temperature, ignored or masked rows holding NaN/inf, and values from
the extremes (huge, tiny, ties, -inf), every backend equals the float64 reference
(values and gradients) within the tolerance table; inputs outside the contract raise
ValueError/TypeError naming the argument.  Budgets: see tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from property_support import (  # noqa: E402
    counted,
    KERNEL_FLOATS, LAYOUTS, LOSS_FLOATS, REGIMES, backends, budget, close, fill, generator, interpreted,
    low_precision_close,
    poison_where, raises_naming, rounded_close, seeds, sprinkle, strided_like,
)

temperatures = st.one_of(st.sampled_from([1.0, 0.5, 2.0]), st.floats(1e-3, 100.0))
poisons = st.sampled_from([None, float("nan"), float("inf"), -float("inf")])


@st.composite
def logits_cases(draw, tiny: bool, *, layouts=LAYOUTS):
    """(logits, labels, options) with logits [..., V] and labels of the leading shape."""
    lead = draw(st.lists(st.integers(0, 3 if tiny else 5), max_size=3))
    if tiny:
        V = draw(st.integers(1, 24))
    else:
        V = draw(st.one_of(st.integers(1, 300), st.sampled_from([2047, 2048, 2049, 4100, 9000])))
        if V > 300:  # long rows: a few of them
            lead = lead[:1] + [1] * (len(lead) > 1)
    dtype = draw(st.sampled_from(KERNEL_FLOATS))
    regime = draw(st.sampled_from(REGIMES))
    g = generator(draw(seeds))
    logits = fill((*lead, V), g, regime, torch.float64)
    minus_inf = draw(st.sampled_from([0.0, 0.0, 0.3, 0.95]))
    if minus_inf:
        logits = sprinkle(logits, g, -math.inf, minus_inf)
    logits = logits.to(dtype)
    ignore_index = draw(st.sampled_from([-100, -1, 0, V]))
    labels = torch.randint(0, V, tuple(lead), generator=g)
    ignored = torch.rand(tuple(lead), generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels = torch.where(ignored, torch.full_like(labels, ignore_index), labels)
    labels = labels.to(draw(st.sampled_from([torch.int64, torch.int32])))
    keep = (labels != ignore_index).unsqueeze(-1)
    logits = poison_where(logits, keep, draw(poisons))
    logits = strided_like(logits, draw(st.sampled_from(layouts)))
    return logits, labels, dict(temperature=draw(temperatures), ignore_index=ignore_index), g


def _logprobs_truth(logits, labels, entropy, g_lp, g_ent, **kw):
    x = logits.detach().double().requires_grad_()
    out = reference.logprobs(x, labels, entropy=entropy, **kw)
    lp, ent = out if entropy else (out, None)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0)
    (grad,) = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
    return lp.detach(), (ent.detach() if entropy else None), grad


def _check_grad(grad, expected, dtype, what):
    if dtype == torch.float32:
        close(grad, expected, what=what, elementwise=False)
    else:
        rounded_close(grad, expected, dtype, what=what)


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
            _check_grad(grad, grad_true, logits.dtype, "grad logits")

    check()


# Below this temperature the float32 KL gradient p_j (d_j - E_p d) / T (docs/numerics.md)
# loses relative accuracy ~eps |logit gaps| / T: values are checked at any temperature,
# gradients from here up.
KL_GRAD_MIN_TEMPERATURE = 0.25


@backends
def test_kl_from_logits_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(logits_cases(interpreted(backend_device)), st.sampled_from(["none", "both", "policy", "ref"]),
           st.booleans(), st.booleans())
    @counted
    def check(case, minus_inf, masked, ref_grad):
        logits, _, kw, g = case
        logits = logits.detach().double().nan_to_num(0.0, 0.0, 0.0).to(logits.dtype)
        ref = (logits.double() + fill(logits.shape, g, "normal", torch.float64)).to(logits.dtype)
        # -inf where both have it (p = q = 0), in the policy only (p = 0), or in the
        # reference only (q = 0 < p: KL = inf, as it should be)
        hole = torch.rand(logits.shape, generator=g) < 0.3
        if minus_inf in ("both", "policy"):
            logits = torch.where(hole, -math.inf, logits.double()).to(logits.dtype)
        if minus_inf in ("both", "ref"):
            ref = torch.where(hole, -math.inf, ref.double()).to(ref.dtype)
        mask = torch.rand(logits.shape[:-1], generator=g) < 0.7 if masked else None
        if mask is not None:
            keep = mask.unsqueeze(-1)
            logits = poison_where(logits, keep, math.nan)
            ref = poison_where(ref, keep, math.inf)
        logits, ref = logits.to(device), ref.to(device)
        mask = mask.to(device) if mask is not None else None
        g_kl = torch.randn(logits.shape[:-1], generator=g).to(device)
        xt = logits.double().requires_grad_()
        rt = ref.double().requires_grad_()
        kl_true = reference.kl_from_logits(xt, rt, temperature=kw["temperature"], mask=mask)
        x = logits.clone().requires_grad_()
        r = ref.clone().requires_grad_(ref_grad)
        kl = rlkernels.kl_from_logits(x, r, temperature=kw["temperature"], mask=mask, backend=backend)
        assert kl.dtype == torch.float32 and kl.shape == logits.shape[:-1]
        # where float64 keeps a p_j that float32 flushes to 0 next to q_j = 0, the truth
        # is inf and float32 arithmetic (PyTorch's too) gives a finite KL
        kl_same = reference.kl_from_logits(logits.float(), ref.float(), temperature=kw["temperature"], mask=mask)
        close(kl, kl_true, what="kl", same_dtype=kl_same)
        if mask is not None:
            assert bool((kl[~mask] == 0).all())
        finite_rows = torch.isfinite(kl_true.detach())
        if kl.numel() == 0 or kw["temperature"] < KL_GRAD_MIN_TEMPERATURE:
            return
        # gradients where KL is finite (an infinite KL has no meaningful gradient)
        weights = torch.where(finite_rows, g_kl, 0)
        grads_true = torch.autograd.grad((kl_true * weights.double()).nansum(), (xt, rt))
        grads = torch.autograd.grad((kl * weights).nansum(), (x, r) if ref_grad else (x,))
        rows = finite_rows.unsqueeze(-1).expand(logits.shape)
        for ours, truth, what in zip(grads, grads_true, ("grad logits", "grad ref_logits")):
            assert ours.dtype == logits.dtype
            ours, truth = torch.where(rows, ours.double(), 0), torch.where(rows, truth, 0)
            _check_grad(ours, truth, logits.dtype, what)

    check()


KL_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs", "k1+", "k3+")


@backends
def test_kl_penalty_property(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device)
    @given(st.lists(st.integers(0, 3 if tiny else 9), max_size=3), st.sampled_from(LOSS_FLOATS),
           st.sampled_from(LOSS_FLOATS), st.sampled_from(KL_KINDS),
           st.one_of(st.none(), st.just(math.inf), st.floats(1e-3, 50.0)), st.sampled_from(REGIMES),
           st.sampled_from([0.0, 0.0, 0.2]), seeds)
    @counted
    def check(shape, dtype, ref_dtype, kind, clamp, regime, minus_inf, seed):
        g = generator(seed)
        lp = sprinkle(-fill(shape, g, regime, torch.float64).abs(), g, -math.inf, minus_inf).to(dtype)
        ref = sprinkle(-fill(shape, g, regime, torch.float64).abs(), g, -math.inf, minus_inf).to(ref_dtype)
        lp, ref = lp.to(device), ref.to(device)
        xt, rt = lp.double().requires_grad_(), ref.double().requires_grad_()
        truth = reference.kl_penalty(xt, rt, kind, clamp=clamp)
        x, r = lp.clone().requires_grad_(), ref.clone().requires_grad_()
        value = rlkernels.kl_penalty(x, r, kind, clamp=clamp, backend=backend)
        # k1+ / k3+ carry the value of k1 / k3 (the reference's straight-through trick
        # turns an infinite value into inf - inf = NaN)
        truth_value = reference.kl_penalty(xt, rt, kind.rstrip("+"), clamp=clamp) if kind.endswith("+") else truth
        common = torch.promote_types(dtype, ref_dtype)
        computed_in = torch.float64 if common == torch.float64 else torch.float32
        assert value.dtype == computed_in and value.shape == lp.shape
        close(value, truth_value, computed_in=computed_in, what="value")
        g_out = torch.randn(value.shape, generator=g, dtype=torch.float64).to(device)
        # gradients where both log-probs are finite (at an infinite log-ratio the
        # reference's autograd gives 0 * inf = NaN or a clamp's 0 where the kernel
        # gives the slope's limit)
        finite = torch.isfinite(lp.double()) & torch.isfinite(ref.double())
        weights = torch.where(finite, g_out, 0)
        grads_true = torch.autograd.grad((truth * weights).nansum(), (xt, rt), allow_unused=True)
        grads = torch.autograd.grad((value * weights.to(value.dtype)).nansum(), (x, r), allow_unused=True)
        for ours, truth_grad, d, what in zip(grads, grads_true, (dtype, ref_dtype), ("grad logprobs", "grad ref")):
            if ours is None or truth_grad is None:
                assert ours is None or bool((ours == 0).all()), what
                continue
            assert ours.dtype == d
            ours, truth_grad = torch.where(finite, ours.double(), 0), torch.where(finite, truth_grad, 0)
            if d in (torch.float32, torch.float64):  # written in the input's dtype
                close(ours, truth_grad, computed_in=d, what=what)
            else:
                rounded_close(ours, truth_grad, d, what=what)

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


KL_PENALTY_BAD = ("kind", "clamp_zero", "clamp_negative", "clamp_nan", "clamp_str", "shape", "int_dtype",
                  "not_tensor", "backend")


@backends
def test_kl_penalty_bad_input(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=20)
    @given(st.sampled_from(KL_PENALTY_BAD), st.integers(1, 5), seeds)
    @counted
    def check(bad, n, seed):
        g = generator(seed)
        lp, ref = fill((n,), g).to(device), fill((n,), g).to(device)
        kw = dict(kind="k3", clamp=None, backend=backend)
        names = bad.split("_")[0]
        if bad == "kind":
            kw["kind"] = "k4"
        elif bad.startswith("clamp"):
            kw["clamp"] = {"clamp_zero": 0.0, "clamp_negative": -1.0, "clamp_nan": math.nan, "clamp_str": "1"}[bad]
        elif bad == "shape":
            ref, names = torch.cat([ref, ref]), "ref_logprobs"
        elif bad == "int_dtype":
            lp, names = lp.to(torch.int64), "logprobs"
        elif bad == "not_tensor":
            ref, names = ref.tolist(), "ref_logprobs"
        elif bad == "backend":
            kw["backend"] = "gpu"
        raises_naming(lambda: rlkernels.kl_penalty(lp, ref, **kw), names)

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


@backends
@pytest.mark.parametrize("temperature", [1.0, 0.01, 0.001])
def test_regression_kl_is_shift_invariant(backend_device, temperature):
    """KL(softmax(a / T) || softmax((a + c) / T)) = 0 for any offset c.  The log-ratio
    sum used to be kept uncentred, so (c / T) rounded and left ~1e-7 c / T in KL and
    1e-7 c / T^2 in the gradient (1.3e-5 and 0.013 for V = 1, T = 1e-3)."""
    backend, device = backend_device
    V = 17 if interpreted(backend_device) else 3000
    for rows, offset in ((torch.randn(1, 1), 0.25), (torch.randn(4, V) * 3, 40.0), (torch.randn(4, V), -1e3)):
        rows = (rows * 1024).round() / 1024  # a grid on which a + offset is exact in float32
        logits = rows.to(device).requires_grad_()
        ref = (rows + offset).to(device)
        assert torch.equal(ref.double() - rows.double(), torch.full_like(rows.double(), offset).to(device))
        kl = rlkernels.kl_from_logits(logits, ref, temperature=temperature, backend=backend)
        truth = reference.kl_from_logits(rows.double(), ref.double().cpu(), temperature=temperature)
        (grad,) = torch.autograd.grad(kl.sum(), logits)
        xt = rows.double().requires_grad_()
        (grad_true,) = torch.autograd.grad(reference.kl_from_logits(xt, ref.double().cpu(), temperature=temperature)
                                           .sum(), xt)
        close(kl, truth, what="kl")
        close(grad, grad_true, what="grad", elementwise=False)
        assert float(kl.abs().max()) < 1e-6


@backends
@pytest.mark.parametrize("gap", [10.0, 70.0, 1e4])
def test_regression_kl_is_inf_where_the_reference_rules_a_token_out(backend_device, gap):
    """q_j = 0 (ref logit -inf) next to a finite policy logit makes KL inf, however small
    p_j: the kernels flush p_j below 2^-125 to 0 and used to return a finite KL."""
    backend, device = backend_device
    logits = torch.tensor([[gap, 0.0, -gap], [0.0, 1.0, 2.0]], device=device)
    ref = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 1.0, 2.0]], device=device)
    for temperature in (1.0, 0.5):
        kl = rlkernels.kl_from_logits(logits, ref, temperature=temperature, backend=backend)
        truth = reference.kl_from_logits(logits.double(), ref.double(), temperature=temperature)
        assert float(kl[0]) == math.inf and float(truth[0]) == math.inf
        close(kl[1:], truth[1:], what="kl")
    # the policy ruling the token out too (both -inf) is fine
    both = torch.tensor([[1.0, 0.0, -math.inf]], device=device)
    assert math.isfinite(float(rlkernels.kl_from_logits(both, both, backend=backend)[0]))
