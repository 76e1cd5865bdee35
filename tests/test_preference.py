"""dpo_loss and sequence_logprobs: every backend against the reference and TRL's
formulas, extreme margins, gradients, opcheck, torch.compile and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, scaled_close

KINDS = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def pairs(B, dtype, device, spread=3.0):
    return [(torch.randn(B, device=device) * spread - 50).to(dtype) for _ in range(4)]


def run(fn, inputs, **kw):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    losses, chosen, rejected = fn(*xs, **kw)
    grads = torch.autograd.grad((losses * torch.linspace(0.5, 1.5, losses.numel(), device=losses.device,
                                                         dtype=losses.dtype)).sum(), xs)
    return losses, chosen, rejected, grads


def trl_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type, ls):
    """TRL DPOTrainer.dpo_loss for these loss types, written out."""
    logratios = chosen_logps - rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize("kind,ls", KINDS)
@pytest.mark.parametrize("B", [1, 7, 300])
def test_dpo_matches_trl(backend_device, kind, ls, B):
    backend, device = backend_device
    inputs = pairs(B, torch.float64, device)
    kw = dict(beta=0.3, kind=kind, label_smoothing=ls)
    losses, chosen, rejected, grads = run(rlkernels.dpo_loss, inputs, backend=backend, **kw)
    t_losses, t_chosen, t_rejected, t_grads = run(
        lambda *x, **k: trl_dpo_loss(*x, 0.3, kind, ls), inputs)
    scaled_close(losses, t_losses, torch.float64, "losses")
    scaled_close(chosen, t_chosen, torch.float64, "chosen_rewards")
    scaled_close(rejected, t_rejected, torch.float64, "rejected_rewards")
    for g, t_g, name in zip(grads, t_grads, ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")):
        scaled_close(g, t_g, torch.float64, name)
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,ls", KINDS)
def test_dpo_dtypes(backend_device, dtype, kind, ls):
    backend, device = backend_device
    inputs = pairs(33, dtype, device)
    kw = dict(beta=0.2, kind=kind, label_smoothing=ls)
    losses, chosen, rejected, grads = run(rlkernels.dpo_loss, inputs, backend=backend, **kw)
    t_losses, t_chosen, t_rejected, t_grads = run(reference.dpo_loss, [t.double() for t in inputs], **kw)
    assert losses.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in grads)
    scaled_close(losses, t_losses, dtype, "losses")
    scaled_close(chosen, t_chosen, dtype, "chosen")
    if dtype != torch.bfloat16:
        for g, t_g in zip(grads, t_grads):
            scaled_close(g, t_g, dtype, "grad")


def test_dpo_by_hand():
    zero = [torch.zeros(2, dtype=torch.float64) for _ in range(4)]
    beta = 0.5
    expected = {"sigmoid": math.log(2.0), "robust": math.log(2.0), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2}
    for kind, value in expected.items():
        losses, _, _ = rlkernels.dpo_loss(*zero, beta=beta, kind=kind)
        scaled_close(losses, torch.full((2,), value, dtype=torch.float64), torch.float64, kind)
    # z = 2 nats of preference margin: sigmoid gives -log sigmoid(beta z), its slope -beta sigmoid(-beta z)
    pc = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    losses, chosen, _ = rlkernels.dpo_loss(pc, *[torch.zeros(1, dtype=torch.float64)] * 3, beta=beta)
    (g,) = torch.autograd.grad(losses.sum(), pc)
    scaled_close(losses, torch.tensor([math.log1p(math.exp(-1.0))], dtype=torch.float64), torch.float64)
    scaled_close(g, torch.tensor([-beta / (1 + math.e)], dtype=torch.float64), torch.float64)
    scaled_close(chosen, torch.tensor([1.0], dtype=torch.float64), torch.float64)


@pytest.mark.parametrize("kind,ls", KINDS)
def test_dpo_extreme_margins(backend_device, kind, ls):
    """Margins of +-1e4 nats: no overflow in logsigmoid or its slope."""
    backend, device = backend_device
    margin = torch.tensor([-1e4, -50.0, -1e-3, 0.0, 1e-3, 50.0, 1e4], dtype=torch.float32, device=device)
    zeros = torch.zeros_like(margin)
    inputs = [margin, zeros, zeros, zeros]
    kw = dict(beta=0.1, kind=kind, label_smoothing=ls)
    losses, _, _, grads = run(rlkernels.dpo_loss, inputs, backend=backend, **kw)
    t_losses, _, _, t_grads = run(reference.dpo_loss, [t.double() for t in inputs], **kw)
    assert torch.isfinite(losses).all() and all(torch.isfinite(g).all() for g in grads)
    scaled_close(losses, t_losses, torch.float32, "losses")
    scaled_close(grads[0], t_grads[0], torch.float32, "grad")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind,ls", KINDS)
def test_dpo_gradcheck(backend, kind, ls):
    inputs = tuple(t.requires_grad_() for t in pairs(5, torch.float64, "cpu", spread=2.0))
    assert torch.autograd.gradcheck(
        lambda *x: rlkernels.dpo_loss(*x, beta=0.4, kind=kind, label_smoothing=ls, backend=backend)[0], inputs)


# ---- sequence_logprobs ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 37), (3, 1100)])
def test_sequence_logprobs(backend_device, dtype, average, B, T):
    backend, device = backend_device
    x = (-torch.rand(B, T, device=device) * 5).to(dtype)
    mask = torch.rand(B, T, device=device) > 0.3
    mask[B // 2] = False  # an empty row
    poison = torch.tensor([float("nan"), -float("inf")], device=device, dtype=dtype)
    x_poisoned = torch.where(mask, x, poison[torch.randint(0, 2, (B, T), device=device)])
    xs = x_poisoned.clone().requires_grad_()
    out = rlkernels.sequence_logprobs(xs, mask, average=average, backend=backend)
    weights = torch.linspace(1, 2, B, device=device)
    (grad,) = torch.autograd.grad((out * weights).sum(), xs)
    truth = reference.sequence_logprobs(x.double(), mask, average=average)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    scaled_close(out, truth, dtype)
    counts = mask.sum(-1, keepdim=True).clamp(min=1).double()
    expected_grad = torch.where(mask, (weights.double()[:, None] / (counts if average else 1)), 0)
    scaled_close(grad, expected_grad.to(dtype), dtype)
    assert out[B // 2].item() == 0
    unmasked = rlkernels.sequence_logprobs(x, average=average, backend=backend)
    scaled_close(unmasked, reference.sequence_logprobs(x.double(), average=average), dtype)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sequence_logprobs_gradcheck(backend):
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 10) > 0.4
    for average in (False, True):
        assert torch.autograd.gradcheck(
            lambda t: rlkernels.sequence_logprobs(t, mask, average=average, backend=backend), (x,))


# ---- torch.library integration ----------------------------------------------------------------

def test_opcheck():
    inputs = [t.requires_grad_() for t in pairs(6, torch.float32, "cpu")]
    x = torch.randn(4, 9, requires_grad=True)
    mask = torch.rand(4, 9) > 0.3
    ops = [(torch.ops.rlkernels.dpo_loss.default, torch.ops.rlkernels.sequence_logprobs.default)]
    if TRITON_ON_CPU:
        ops.append((torch.ops.rlkernels.dpo_loss_triton.default, torch.ops.rlkernels.sequence_logprobs_triton.default))
    for dpo_op, seq_op in ops:
        torch.library.opcheck(dpo_op, (*inputs, 0.1, "sigmoid", 0.1))
        torch.library.opcheck(dpo_op, (*[t.double() for t in inputs], 0.5, "ipo", 0.0))
        torch.library.opcheck(seq_op, (x, mask, True))
        torch.library.opcheck(seq_op, (x.double().detach().requires_grad_(), None, False))
    counts = mask.sum(-1).float()
    backward_ops = [torch.ops.rlkernels.sequence_logprobs_backward.default]
    if TRITON_ON_CPU:
        backward_ops.append(torch.ops.rlkernels.sequence_logprobs_backward_triton.default)
    for op in backward_ops:
        torch.library.opcheck(op, (torch.randn(4), mask, counts, True, 9, torch.bfloat16))
        torch.library.opcheck(op, (torch.randn(4, dtype=torch.float64), None, counts.double(), False, 9,
                                   torch.float64))


def test_torch_compile_fullgraph():
    B, T = 4, 12
    policy = torch.randn(2 * B, T, requires_grad=True)
    ref = torch.randn(2 * B, T)
    mask = torch.rand(2 * B, T) > 0.2

    def step(lp):
        seq = rlkernels.sequence_logprobs(lp, mask)
        ref_seq = rlkernels.sequence_logprobs(ref, mask)
        losses, chosen, rejected = rlkernels.dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta=0.1)
        return losses.mean(), (chosen > rejected).float().mean()

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    loss, accuracy = compiled(policy)
    (grad,) = torch.autograd.grad(loss, policy)
    seq = reference.sequence_logprobs(policy, mask)
    ref_seq = reference.sequence_logprobs(ref, mask)
    t_losses, _, _ = reference.dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta=0.1)
    (t_grad,) = torch.autograd.grad(t_losses.mean(), policy)
    scaled_close(loss, t_losses.mean())
    scaled_close(grad, t_grad)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(beta=0.0), ValueError, "beta must be > 0.0"),
    (dict(beta=-1.0), ValueError, "beta must be > 0.0"),
    (dict(kind="kto"), ValueError, "kind must be one of"),
    (dict(kind="hinge", label_smoothing=0.1), ValueError, "label_smoothing applies to kind 'sigmoid' and 'robust'"),
    (dict(kind="robust", label_smoothing=0.5), ValueError, "label_smoothing must be < 0.5"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be >= 0.0"),
    (dict(policy_rejected=torch.randn(4)), ValueError, "policy_rejected must have the shape of policy_chosen"),
    (dict(policy_chosen=torch.randn(3, 2)), ValueError, "policy_chosen must be 1-D"),
    (dict(ref_chosen=torch.ones(3, dtype=torch.int64)), TypeError, "ref_chosen must have dtype"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is unavailable"),
])
def test_dpo_bad_input(kwargs, error, match):
    args = dict(policy_chosen=torch.randn(3), policy_rejected=torch.randn(3), ref_chosen=torch.randn(3),
                ref_rejected=torch.randn(3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.dpo_loss(args.pop("policy_chosen"), args.pop("policy_rejected"), args.pop("ref_chosen"),
                           args.pop("ref_rejected"), **args)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(token_logprobs=torch.randn(5)), ValueError, "token_logprobs must be 2-D"),
    (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(average=1), TypeError, "average must be a bool"),
    (dict(backend="triton-gpu"), ValueError, "backend must be one of"),
])
def test_sequence_logprobs_bad_input(kwargs, error, match):
    args = dict(token_logprobs=torch.randn(3, 5), mask=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.sequence_logprobs(args.pop("token_logprobs"), args.pop("mask"), **args)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_from_logits(average):
    """The logits + labels form equals log_softmax + gather + masked sum, gradient included."""
    logits = torch.randn(3, 6, 11, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 2] = -100
    mask = torch.rand(3, 6) > 0.3
    mask[2] = False
    out = rlkernels.sequence_logprobs(logits, mask, labels=labels, average=average)
    valid = mask & (labels != -100)
    token = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token = torch.where(valid, token, torch.zeros_like(token))
    expected = token.sum(1)
    if average:
        expected = torch.where(valid.sum(1) > 0, expected / valid.sum(1).clamp(min=1), torch.zeros_like(expected))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn(3)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    (grad_ref,) = torch.autograd.grad((expected * weights.double()).sum(), logits)
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=1e-5, atol=1e-6)
    assert torch.all(grad[2] == 0)
    with pytest.raises(ValueError, match="labels must have shape"):
        rlkernels.sequence_logprobs(logits, mask, labels=labels[:, :5])


# ---- dpo_sequence_loss: the fused step against the composition --------------------------------

SEQUENCE_KINDS = KINDS + [("robust", 0.0)]


def token_pairs(B, T, dtype, device, *, poison=True, seed=0):
    """[2B, T] policy and reference token log-probs and a mask with interior gaps, an
    all-masked row (the rejected row of pair 0) and, with poison, NaN and -inf in masked
    slots (which must not reach any result)."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2 * B, T, generator=g) * 4
    ref = policy + torch.randn(2 * B, T, generator=g) * 0.3
    mask = torch.rand(2 * B, T, generator=g) > 0.25
    mask[B] = False
    if T > 4:
        mask[0, 1:3] = False  # an interior gap
    if poison:
        bad = torch.tensor([float("nan"), -float("inf")])[torch.randint(0, 2, (2 * B, T), generator=g)]
        policy = torch.where(mask, policy, bad)
        ref = torch.where(mask, ref, bad.flip(0))
    return policy.to(dtype).to(device), ref.to(dtype).to(device), mask.to(device)


def composed(policy, ref, mask, *, backend, average=False, **kw):
    """The composition dpo_sequence_loss fuses, on one backend."""
    B = policy.shape[0] // 2
    seq = rlkernels.sequence_logprobs(policy, mask, average=average, backend=backend)
    ref_seq = rlkernels.sequence_logprobs(ref, mask, average=average, backend=backend)
    return rlkernels.dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], backend=backend, **kw)


def run_both(fn, policy, ref, mask, ref_grad=True, **kw):
    """fn's outputs and the gradients of a weighted loss sum w.r.t. policy (and ref)."""
    x = policy.detach().clone().requires_grad_()
    r = ref.detach().clone().requires_grad_(ref_grad)
    losses, chosen, rejected = fn(x, r, mask, **kw)
    weights = torch.linspace(0.5, 1.5, losses.numel(), device=losses.device, dtype=losses.dtype)
    grads = torch.autograd.grad((losses * weights).sum(), [x, r] if ref_grad else [x])
    return (losses, chosen, rejected), grads


@pytest.mark.parametrize("kind,ls", SEQUENCE_KINDS)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 37), (5, 1031)])
def test_dpo_sequence_matches_composition(backend_device, kind, ls, average, B, T):
    backend, device = backend_device
    policy, ref, mask = token_pairs(B, T, torch.float64, device, seed=B * T)
    kw = dict(beta=0.3, kind=kind, label_smoothing=ls, average=average)
    outs, grads = run_both(rlkernels.dpo_sequence_loss, policy, ref, mask, backend=backend, **kw)
    t_outs, t_grads = run_both(composed, policy, ref, mask, backend="reference", **kw)
    for out, t_out, name in zip(outs, t_outs, ("losses", "chosen_rewards", "rejected_rewards")):
        assert out.shape == (B,) and out.dtype == torch.float64, name
        scaled_close(out, t_out, torch.float64, name)
    for g, t_g, name in zip(grads, t_grads, ("policy_logprobs", "ref_logprobs")):
        assert g.dtype == torch.float64 and torch.isfinite(g).all(), name
        scaled_close(g, t_g, torch.float64, name)
        assert (g[~mask] == 0).all(), name
    assert not outs[1].requires_grad and not outs[2].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("average", [False, True])
def test_dpo_sequence_dtypes(backend_device, dtype, average):
    backend, device = backend_device
    policy, ref, mask = token_pairs(6, 129, dtype, device, seed=3)
    kw = dict(beta=0.2, kind="sigmoid", label_smoothing=0.1, average=average)
    outs, grads = run_both(rlkernels.dpo_sequence_loss, policy, ref, mask, backend=backend, **kw)
    t_outs, t_grads = run_both(composed, policy.double(), ref.double(), mask, backend="reference", **kw)
    assert all(o.dtype == torch.float32 for o in outs) and all(g.dtype == dtype for g in grads)
    for out, t_out in zip(outs, t_outs):
        scaled_close(out, t_out, torch.float32)
    # the gradient is a float32 value rounded once to the dtype: within an ulp of the
    # rounded truth (float32: within float32 accumulation's error)
    tol = dict(rtol=max(2 * torch.finfo(dtype).eps, 1e-5), atol=1e-7)
    for g, t_g in zip(grads, t_grads):
        torch.testing.assert_close(g.double(), t_g.to(dtype).double(), **tol)
    # and the composed ops of this backend in that dtype
    c_outs, c_grads = run_both(composed, policy, ref, mask, backend=backend, **kw)
    for out, c_out in zip(outs, c_outs):
        scaled_close(out, c_out, torch.float32)
    for g, c_g in zip(grads, c_grads):
        torch.testing.assert_close(g.double(), c_g.double(), **tol)


@pytest.mark.parametrize("average", [False, True])
def test_dpo_sequence_forward_is_the_composition_bit_for_bit(average):
    """On the CPU the fused op sums each row exactly as sequence_logprobs does, so its
    losses and rewards are the composed ops' to the last bit."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        policy, ref, mask = token_pairs(9, 1500, dtype, "cpu", seed=11)
        for m in (mask, None):
            if m is None:
                policy, ref = policy.nan_to_num(neginf=-30.0), ref.nan_to_num(neginf=-30.0)
            kw = dict(beta=0.1, kind="sigmoid", label_smoothing=0.0)
            fused = rlkernels.dpo_sequence_loss(policy, ref, m, average=average, backend="cpu", **kw)
            parts = composed(policy, ref, m, backend="cpu", average=average, **kw)
            for a, b in zip(fused, parts):
                assert torch.equal(a, b), (dtype, m is None)


def test_dpo_sequence_on_several_threads():
    """Rows enough for the CPU kernel to split them over threads: the same bits as one
    thread and as the composition, the same gradient."""
    policy, ref, mask = token_pairs(64, 8192, torch.float32, "cpu", seed=13)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            results.append(run_both(rlkernels.dpo_sequence_loss, policy, ref, mask, backend="cpu", average=True))
        composed_outs = composed(policy, ref, mask, backend="cpu", average=True)
    finally:
        torch.set_num_threads(threads)
    (one_outs, one_grads), (many_outs, many_grads) = results
    for a, b, c in zip(one_outs, many_outs, composed_outs):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(one_grads, many_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,ls", SEQUENCE_KINDS)
def test_dpo_sequence_infinite_logprobs(backend_device, kind, ls):
    """-inf log-probs on valid tokens (a chosen row of pair 0, a rejected row of pair 1,
    both reference rows of pair 2): the same infinities, NaNs and gradients as the
    composition of the same backend."""
    backend, device = backend_device
    policy, ref, mask = token_pairs(4, 17, torch.float32, device, seed=5)
    mask[[0, 5, 2, 6], 3] = True
    policy[0, 3] = -float("inf")
    policy[5, 3] = -float("inf")
    ref[2, 3] = ref[6, 3] = -float("inf")
    kw = dict(beta=0.5, kind=kind, label_smoothing=ls)
    outs, grads = run_both(rlkernels.dpo_sequence_loss, policy, ref, mask, backend=backend, **kw)
    c_outs, c_grads = run_both(composed, policy, ref, mask, backend=backend, **kw)
    for a, b in zip(outs + grads, c_outs + c_grads):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert not torch.isfinite(outs[0][[0, 2]]).any()  # the cases are there: inf (pair 0), NaN (pair 2)


def test_dpo_sequence_layouts_and_masks():
    """Non-contiguous inputs, a 0/1 float mask, no mask, mixed dtypes, a reference without
    gradient: each as the composition."""
    policy, ref, mask = token_pairs(4, 23, torch.float32, "cpu", poison=False, seed=7)
    policy_t = policy.t().contiguous().t()  # same values, column-major
    assert not policy_t.is_contiguous()
    kw = dict(beta=0.1, average=True)
    ref_t = ref.t().contiguous().t()
    for p, r, m in [(policy_t, ref_t, mask.float()), (policy, ref, None), (policy, ref.double(), mask),
                    (policy, ref.bfloat16(), mask.to(torch.uint8))]:
        outs, grads = run_both(rlkernels.dpo_sequence_loss, p, r, m, backend="cpu", **kw)
        t_outs, t_grads = run_both(composed, p.double(), r.double(), None if m is None else m.bool(),
                                   backend="reference", **kw)
        for out, t_out in zip(outs, t_outs):
            scaled_close(out, t_out, torch.float32)
        assert grads[0].dtype == p.dtype and grads[1].dtype == r.dtype
        for g, t_g in zip(grads, t_grads):
            if g.dtype == torch.bfloat16:  # a float32 gradient rounded once: within an ulp of the rounded truth
                torch.testing.assert_close(g.double(), t_g.to(g.dtype).double(), rtol=2 * torch.finfo(g.dtype).eps,
                                           atol=1e-7)
            else:
                scaled_close(g, t_g, torch.float32)
    (x_grad,) = run_both(rlkernels.dpo_sequence_loss, policy, ref, mask, ref_grad=False)[1]
    (t_grad,) = run_both(composed, policy.double(), ref.double(), mask, ref_grad=False, backend="reference")[1]
    scaled_close(x_grad, t_grad, torch.float32)


def test_dpo_sequence_gradients_only_where_needed():
    policy, ref, mask = token_pairs(3, 8, torch.float32, "cpu", poison=False)
    r = ref.clone().requires_grad_()
    losses, _, _ = rlkernels.dpo_sequence_loss(policy, r, mask, backend="cpu")
    (g,) = torch.autograd.grad(losses.sum(), r)
    (t,) = torch.autograd.grad(composed(policy, r, mask, backend="cpu")[0].sum(), r)
    scaled_close(g, t)
    with torch.no_grad():
        out = rlkernels.dpo_sequence_loss(policy.requires_grad_(), ref, mask)
    assert not out[0].requires_grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("kind,ls", [("sigmoid", 0.2), ("ipo", 0.0), ("robust", 0.1)])
def test_dpo_sequence_gradcheck(backend, average, kind, ls):
    policy, ref, mask = token_pairs(2, 5, torch.float64, "cpu", poison=False, seed=2)
    inputs = (policy.requires_grad_(), ref.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, r: rlkernels.dpo_sequence_loss(
        x, r, mask, beta=0.4, kind=kind, label_smoothing=ls, average=average, backend=backend)[0], inputs)


def test_dpo_sequence_opcheck():
    policy, ref, mask = token_pairs(3, 7, torch.float32, "cpu", poison=False)
    ops = [(torch.ops.rlkernels.dpo_sequence_loss.default, torch.ops.rlkernels.dpo_sequence_loss_backward.default)]
    if TRITON_ON_CPU:
        ops.append((torch.ops.rlkernels.dpo_sequence_loss_triton.default,
                    torch.ops.rlkernels.dpo_sequence_loss_backward_triton.default))
    for op, backward_op in ops:
        torch.library.opcheck(op, (policy.clone().requires_grad_(), ref, mask, 0.1, "sigmoid", 0.1, False))
        torch.library.opcheck(op, (policy.double().requires_grad_(), ref.double().requires_grad_(), None, 0.5,
                                   "ipo", 0.0, True))
        coef = torch.randn(6)
        torch.library.opcheck(backward_op, (torch.randn(3), mask, coef, 1.0, 7, torch.bfloat16))
        torch.library.opcheck(backward_op, (torch.randn(3, dtype=torch.float64), None, coef.double(), -1.0, 7,
                                            torch.float64))
        torch.library.opcheck(backward_op, (torch.randn(1).expand(3), mask, coef, -1.0, 7, torch.float32))


def test_dpo_sequence_torch_compile_fullgraph():
    policy, ref, mask = token_pairs(4, 12, torch.float32, "cpu", poison=False)
    policy.requires_grad_()

    def step(x):
        losses, chosen, rejected = rlkernels.dpo_sequence_loss(x, ref, mask, beta=0.1)
        return losses.mean(), (chosen > rejected).float().mean()

    loss, _ = torch.compile(step, fullgraph=True, backend="eager")(policy)
    (grad,) = torch.autograd.grad(loss, policy)
    t_loss = composed(policy, ref, mask, backend="reference", beta=0.1)[0].mean()
    (t_grad,) = torch.autograd.grad(t_loss, policy)
    scaled_close(loss, t_loss)
    scaled_close(grad, t_grad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(policy_logprobs=torch.randn(3, 5), ref_logprobs=torch.randn(3, 5), mask=None), ValueError,
     "even number of rows"),
    (dict(policy_logprobs=torch.randn(4)), ValueError, "policy_logprobs must be 2-D"),
    (dict(ref_logprobs=torch.randn(4, 6)), ValueError, "ref_logprobs must have the shape of policy_logprobs"),
    (dict(ref_logprobs=torch.ones(4, 5, dtype=torch.int64)), TypeError, "ref_logprobs must have dtype"),
    (dict(mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=torch.full((4, 5), 2.0)), ValueError, "mask must hold only 0 and 1"),
    (dict(average=1), TypeError, "average must be a bool"),
    (dict(beta=0.0), ValueError, "beta must be > 0.0"),
    (dict(kind="kto"), ValueError, "kind must be one of"),
    (dict(kind="ipo", label_smoothing=0.1), ValueError, "label_smoothing applies to kind 'sigmoid' and 'robust'"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is unavailable"),
])
def test_dpo_sequence_bad_input(kwargs, error, match):
    args = dict(policy_logprobs=torch.randn(4, 5), ref_logprobs=torch.randn(4, 5), mask=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.dpo_sequence_loss(args.pop("policy_logprobs"), args.pop("ref_logprobs"), args.pop("mask"), **args)


def test_dpo_sequence_empty_batch(backend_device):
    backend, device = backend_device
    x = torch.zeros(0, 5, device=device, requires_grad=True)
    losses, chosen, rejected = rlkernels.dpo_sequence_loss(x, torch.zeros(0, 5, device=device), backend=backend)
    assert losses.shape == chosen.shape == rejected.shape == (0,)
    (g,) = torch.autograd.grad(losses.sum(), x)
    assert g.shape == (0, 5)
