"""Determinism and batch invariance (docs/numerics.md).

Determinism: every public op, run twice on the same inputs, gives bitwise-identical
outputs and gradients on every backend, and on the C++ backend the same bits with 1 or
2 threads (inputs are large enough that the kernels do split across threads).

Batch invariance: a sequence's log-probs (logprobs, kl_from_logits, linear_logprobs,
sequence_logprobs) are bitwise the same whether it is computed alone, inside a bigger
batch, or with extra padding columns; and on-policy, linear_ppo_loss sees exactly the
log-probs linear_logprobs gave for the whole batch (ratio 1, approx_kl 0) whatever the
micro-batch and chunk sizes."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from property_support import (  # noqa: E402
    KERNEL_FLOATS, backends, bitwise_equal, budget, counted, fill, generator, interpreted, seeds,
)


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _leaf(t, device):
    return t.to(device).requires_grad_()


def _grads(outputs, leaves, g):
    """Outputs plus the gradients of a fixed random weighting of them."""
    outputs = [o for o in outputs if isinstance(o, torch.Tensor)]
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
               for o in outputs if o.is_floating_point() and o.requires_grad)
    grads = list(torch.autograd.grad(loss, leaves)) if isinstance(loss, torch.Tensor) else []
    return [o.detach() for o in outputs] + grads


def op_runs(device: str, backend: str, large: bool):
    """name -> fn() returning every output and gradient of one call of the op on fixed
    inputs; `large` sizes make the C++ kernels split their work across threads."""
    runs = {}
    g0 = generator(0)
    if large:
        N, V, T_long, B_long, H = 128, 32768, 300_000, 16, 64
    else:
        N, V, T_long, B_long, H = 3, 17, 9, 2, 4

    logits = fill((N, V), g0, "wide")
    ref_logits = logits + fill((N, V), g0)
    labels = torch.randint(0, V, (N,), generator=g0)
    labels[1] = -100

    def logprobs():
        x = _leaf(logits, device)
        out = rlkernels.logprobs(x, labels.to(device), entropy=True, temperature=0.7, backend=backend)
        return _grads(out, [x], generator(1))
    runs["logprobs"] = logprobs

    def kl_from_logits():
        x, r = _leaf(logits, device), _leaf(ref_logits, device)
        out = rlkernels.kl_from_logits(x, r, temperature=0.9, backend=backend)
        return _grads([out], [x, r], generator(1))
    runs["kl_from_logits"] = kl_from_logits

    n_tokens = B_long * T_long
    lp = -fill((B_long, T_long), g0).abs()
    old = lp + 0.3 * fill((B_long, T_long), g0)
    adv = fill((B_long, T_long), g0)
    mask = torch.rand(B_long, T_long, generator=g0) < 0.8

    def kl_penalty():
        x, r = _leaf(lp.reshape(-1), device), _leaf(old.reshape(-1), device)
        return _grads([rlkernels.kl_penalty(x, r, "k3", backend=backend)], [x, r], generator(1))
    runs["kl_penalty"] = kl_penalty

    for agg in ("token-mean", "seq-mean-token-mean"):
        def ppo(agg=agg):
            x = _leaf(lp, device)
            loss, stats = rlkernels.ppo_loss(x, old.to(device), adv.to(device), mask.to(device), agg=agg,
                                             dual_clip=3.0, backend=backend)
            return _grads([loss, *stats.values()], [x], generator(1))
        runs[f"ppo_loss[{agg}]"] = ppo

    def grpo():
        x = _leaf(lp, device)
        loss, stats = rlkernels.grpo_loss(x, old.to(device), adv[:, 0].contiguous().to(device), mask.to(device),
                                          ref_logprobs=old.to(device), beta=0.04, backend=backend)
        return _grads([loss, *stats.values()], [x], generator(1))
    runs["grpo_loss"] = grpo

    def value():
        x = _leaf(adv, device)
        loss, stats = rlkernels.value_loss(x, old.to(device), lp.to(device), mask.to(device), clip=0.2,
                                           backend=backend)
        return _grads([loss, *stats.values()], [x], generator(1))
    runs["value_loss"] = value

    def sequence():
        x = _leaf(lp, device)
        out = rlkernels.sequence_logprobs(x, mask.to(device), average=True, backend=backend)
        return _grads([out], [x], generator(1))
    runs["sequence_logprobs"] = sequence

    def dpo():
        pairs = [_leaf(t.reshape(-1)[: n_tokens // 8], device) for t in (lp, old, adv, lp * 0.5)]
        out = rlkernels.dpo_loss(*pairs, beta=0.1, kind="sigmoid", label_smoothing=0.1, backend=backend)
        return _grads(list(out), pairs, generator(1))
    runs["dpo_loss"] = dpo

    def advantages():
        adv_out, ret = rlkernels.gae(adv.to(device), old.to(device), mask.to(device), gamma=0.99, lam=0.95,
                                     backend=backend)
        returns = rlkernels.discounted_returns(adv.to(device), mask.to(device), gamma=0.99, backend=backend)
        scores = adv.reshape(-1)[: (n_tokens // 8) * 8].to(device)
        group, equal = rlkernels.group_advantages(scores, 8, scale="batch", backend=backend)
        mean = rlkernels.masked_mean(adv.to(device), mask.to(device), backend=backend)
        rows = rlkernels.masked_mean(adv.to(device), mask.to(device), dim=1, backend=backend)
        white = rlkernels.masked_whiten(adv.to(device), mask.to(device), backend=backend)
        return [adv_out, ret, returns, group, equal, mean, rows, white]
    runs["advantages"] = advantages

    def multi_tensor():
        tensors = [adv.to(device), old[:, :1000].to(device)]
        bucket = rlkernels.pack_tensors(tensors, dtype=torch.bfloat16, scale=0.5, backend=backend)
        targets = [torch.empty_like(t) for t in tensors]
        rlkernels.unpack_tensors(bucket, targets, scale=2.0, backend=backend)
        mixed = rlkernels.gossip_mix(adv.to(device), old.to(device), lp.to(device), (0.5, 0.25, 0.25),
                                     backend=backend)
        return [bucket, *targets, mixed]
    runs["pack_unpack_gossip"] = multi_tensor

    hidden = fill((B_long, 16 if large else 3, H), g0)
    weight = fill((4096 if large else 11, H), g0) / math.sqrt(H)
    tokens = torch.randint(0, weight.shape[0], hidden.shape[:2], generator=g0)

    def linear_logprobs():
        h, w = _leaf(hidden, device), _leaf(weight, device)
        out = rlkernels.linear_logprobs(h, w, tokens.to(device), entropy=True, backend=backend)
        return _grads(out, [h, w], generator(1))
    runs["linear_logprobs"] = linear_logprobs

    def linear_ppo():
        h, w = _leaf(hidden, device), _leaf(weight, device)
        B, T = tokens.shape
        loss, stats = rlkernels.linear_ppo_loss(h, w, tokens.to(device), old[:, :T].contiguous().to(device),
                                                adv[:, :T].contiguous().to(device), entropy_coef=0.01,
                                                backend=backend)
        return _grads([loss, *stats.values()], [h, w], generator(1))
    runs["linear_ppo_loss"] = linear_ppo
    return runs


RUN_NAMES = list(op_runs("cpu", "cpu", False))


@backends
@pytest.mark.parametrize("name", RUN_NAMES)
def test_two_calls_are_bitwise_identical(backend_device, name):
    backend, device = backend_device
    fn = op_runs(device, backend, large=not interpreted(backend_device))[name]
    with threads(2):
        first, second = fn(), fn()
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert bitwise_equal(a, b), f"{name}: output {i} differs between two calls"


@pytest.mark.parametrize("name", RUN_NAMES)
def test_cpu_results_do_not_depend_on_the_thread_count(name):
    fn = op_runs("cpu", "cpu", large=True)[name]
    with threads(1):
        one = fn()
    with threads(2):
        two = fn()
    for i, (a, b) in enumerate(zip(one, two)):
        assert bitwise_equal(a, b), f"{name}: output {i} differs between 1 and 2 threads"


# ---- batch invariance -----------------------------------------------------------------------

@st.composite
def batches(draw, tiny: bool):
    """A batch [B, T] of sequences with a chosen row, its padding and a dtype."""
    B = draw(st.integers(1, 3 if tiny else 12))
    T = draw(st.integers(1, 3 if tiny else 40))
    row = draw(st.integers(0, B - 1))
    pad = draw(st.integers(1, 2 if tiny else 700))
    return B, T, row, pad, draw(st.sampled_from(KERNEL_FLOATS)), generator(draw(seeds))


def _pad_right(t: torch.Tensor, pad: int, value) -> torch.Tensor:
    """t [B, T, ...] with `pad` more columns holding `value`."""
    extra = torch.full((t.shape[0], pad, *t.shape[2:]), value, dtype=t.dtype)
    return torch.cat([t, extra], 1)


@backends
def test_logprobs_batch_invariance(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device, examples=30)
    @given(batches(tiny), st.integers(1, 16 if tiny else 5000), st.booleans())
    @counted
    def check(batch, V, kl):
        B, T, row, pad, dtype, g = batch
        logits = fill((B, T, V), g, "wide", dtype)
        labels = torch.randint(0, V, (B, T), generator=g)

        def run(x, y):
            x = x.to(device).requires_grad_()
            if kl:
                out = rlkernels.kl_from_logits(x, (x.detach() * 0.5).contiguous(), backend=backend)
                outs = [out]
            else:
                outs = list(rlkernels.logprobs(x, y.to(device), entropy=True, backend=backend))
            weights = 1 + 0.1 * torch.arange(x.shape[1], device=device)  # per column: padding adds columns
            (grad,) = torch.autograd.grad(sum((o * weights).sum() for o in outs), x)
            return [o.detach() for o in outs], grad

        full, full_grad = run(logits, labels)
        alone, alone_grad = run(logits[row:row + 1], labels[row:row + 1])
        padded, padded_grad = run(_pad_right(logits, pad, float("nan")), _pad_right(labels, pad, -100))
        for a, b, p in zip(full, alone, padded):
            assert torch.equal(a[row:row + 1], b), "a row alone differs from the row in its batch"
            if not kl:
                assert torch.equal(a, p[:, :T]), "padding columns changed the real tokens' results"
        assert torch.equal(full_grad[row:row + 1], alone_grad)
        if not kl:
            assert torch.equal(full_grad, padded_grad[:, :T])

    check()


@backends
def test_sequence_logprobs_batch_invariance(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=40)
    @given(batches(interpreted(backend_device)), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
           st.booleans())
    @counted
    def check(batch, dtype, average):
        B, T, row, pad, _, g = batch
        tokens = (-fill((B, T), g, "wide", torch.float64).abs()).to(dtype)
        mask = torch.rand(B, T, generator=g) < 0.8
        full = rlkernels.sequence_logprobs(tokens.to(device), mask.to(device), average=average, backend=backend)
        alone = rlkernels.sequence_logprobs(tokens[row:row + 1].to(device), mask[row:row + 1].to(device),
                                            average=average, backend=backend)
        padded = rlkernels.sequence_logprobs(_pad_right(tokens, pad, float("nan")).to(device),
                                             _pad_right(mask, pad, False).to(device), average=average,
                                             backend=backend)
        assert torch.equal(full[row:row + 1], alone), "a row alone differs from the row in its batch"
        assert torch.equal(full, padded), "padding columns changed a sequence's log-prob"

    check()


# The smallest vocabulary for which the lm-head matmul gives each row the same bits
# wherever it sits among the rows (MKL: rows of an [M, H] x [H, V] product with V <= 11
# and H not a multiple of 4 depend on their position; measured for M a multiple of 16).
MIN_VOCAB = 12


@backends
def test_linear_logprobs_batch_invariance(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    # V >= MIN_VOCAB: below it MKL's matmul rounds a row differently by its position
    # among the rows (docs/numerics.md)
    @budget(backend_device, examples=30)
    @given(batches(tiny), st.integers(1, 8 if tiny else 96), st.integers(MIN_VOCAB, 16 if tiny else 700),
           st.booleans(), st.one_of(st.none(), st.integers(1, 64)))
    @counted
    def check(batch, H, V, with_bias, chunk):
        B, T, row, pad, dtype, g = batch
        hidden = fill((B, T, H), g, "normal", dtype)
        weight = (fill((V, H), g) / math.sqrt(H)).to(dtype)
        bias = fill((V,), g, "normal", dtype) if with_bias else None
        labels = torch.randint(0, V, (B, T), generator=g)
        to = (lambda t: None if t is None else t.to(device))

        def run(h, y, chunk_size):
            return rlkernels.linear_logprobs(to(h), to(weight), to(y), bias=to(bias), entropy=True,
                                             chunk_size=chunk_size, backend=backend)

        full = run(hidden, labels, None)
        for a, b in zip(full, run(hidden[row:row + 1], labels[row:row + 1], chunk)):
            assert torch.equal(a[row:row + 1], b), "a row alone differs from the row in its batch"
        for a, b in zip(full, run(_pad_right(hidden, pad, float("nan")), _pad_right(labels, pad, -100), chunk)):
            assert torch.equal(a, b[:, :T]), "padding columns changed the real tokens' results"

    check()


@backends
def test_on_policy_ratio_is_exactly_one(backend_device):
    """The log-probs a rollout computed with linear_logprobs on the whole batch are the
    ones linear_ppo_loss computes on any micro-batch (no old-vs-new mismatch): ratio 1,
    approx_kl 0, no clipping."""
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device, examples=6 if tiny else 25)
    @given(batches(tiny), st.integers(1, 8 if tiny else 64), st.integers(MIN_VOCAB, 16 if tiny else 500),
           st.one_of(st.none(), st.integers(2 if tiny else 1, 40)), st.integers(2 if tiny else 1, 4))
    @counted
    def check(batch, H, V, chunk, micro):
        B, T, _, _, dtype, g = batch
        hidden = fill((B, T, H), g, "normal", dtype)
        weight = (fill((V, H), g) / math.sqrt(H)).to(dtype)
        labels = torch.randint(0, V, (B, T), generator=g)
        mask = torch.rand(B, T, generator=g) < 0.9
        old = rlkernels.linear_logprobs(hidden.to(device), weight.to(device), labels.to(device), backend=backend)
        advantages = fill((B,), g)
        for r0 in range(0, B, micro):
            rows = slice(r0, min(r0 + micro, B))
            _, stats = rlkernels.linear_ppo_loss(hidden[rows].to(device), weight.to(device), labels[rows].to(device),
                                                 old[rows], advantages[rows].to(device), mask[rows].to(device),
                                                 chunk_size=chunk, backend=backend)
            assert float(stats["ratio_max"]) in (0.0, 1.0) and float(stats["approx_kl_k1"]) == 0.0, stats
            assert float(stats["clip_frac_upper"]) == 0.0 and float(stats["clip_frac_lower"]) == 0.0

    check()
