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
