"""Double backward (create_graph=True, then a second grad) for every differentiable
public op on every backend: either the Hessian-vector product matches PyTorch's
autograd through the float64 reference, or the second grad raises a RuntimeError
that says so.  Never silent zeros (the kernels' backward is opaque to autograd)."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels.reference.kl_penalty import KL_KINDS
from support import BACKEND_DEVICE, assert_close

BACKENDS = [b for b, _ in BACKEND_DEVICE if _ == "cpu"] + ["reference"]
UNSUPPORTED = "first derivatives only"


def _outputs(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, tuple) and isinstance(result[1], dict):  # (loss, stats)
        return [result[0]]
    return [t for t in result if isinstance(t, torch.Tensor) and t.requires_grad]


def _scalar(outputs, weights):
    # Not linear in the outputs, so the incoming gradient depends on the inputs too.
    return sum((w * y + 0.25 * y * y).sum() for y, w in zip(outputs, weights))


def hessian_vector(fn, inputs, weights, vectors):
    """(first gradients, H v) of _scalar(fn(*inputs)) with respect to `inputs`."""
    outputs = _outputs(fn(*inputs))
    grads = torch.autograd.grad(_scalar(outputs, weights), inputs, create_graph=True)
    dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vectors))
    return grads, torch.autograd.grad(dot, inputs, allow_unused=True)


def _logits(n=3, vocab=7):
    return torch.randn(n, vocab) * 2


def _labels(n=3, vocab=7):
    labels = torch.randint(0, vocab, (n,))
    labels[1] = -100
    return labels


def _mask(shape):
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[0] = True
    return mask


LABELS = _labels()
MASK_BT = _mask((3, 5))
LP_MASK = _mask((3,))
MASK_2BT = _mask((4, 5))
LINEAR_LABELS = _labels(4, 6)

# name -> (function of (backend, *differentiable inputs), maker of those inputs)
CASES = {
    "logprobs": (lambda b, x: rlkernels.logprobs(x, LABELS, temperature=0.7, backend=b), lambda: [_logits()]),
    "logprobs_inplace": (lambda b, x: rlkernels.logprobs(x * 1.0, LABELS, inplace_backward=b != "reference",
                                                         backend=b), lambda: [_logits()]),
    "logprobs_entropy": (lambda b, x: rlkernels.logprobs(x, LABELS, entropy=True, backend=b), lambda: [_logits()]),
    "kl_from_logits": (lambda b, x, y: rlkernels.kl_from_logits(x, y, temperature=1.3, mask=LP_MASK, backend=b),
                       lambda: [_logits(), _logits()]),
    "linear_logprobs": (lambda b, h, w, c: rlkernels.linear_logprobs(h, w, LINEAR_LABELS, bias=c, entropy=True,
                                                                      backend=b),
                        lambda: [torch.randn(4, 5), torch.randn(6, 5), torch.randn(6)]),
    "sequence_logprobs": (lambda b, x: rlkernels.sequence_logprobs(x, MASK_BT, backend=b),
                          lambda: [torch.randn(3, 5)]),
    "sequence_logprobs_mean": (lambda b, x: rlkernels.sequence_logprobs(x, MASK_BT, average=True, backend=b),
                               lambda: [torch.randn(3, 5)]),
    "sequence_logprobs_from_logits": (lambda b, x: rlkernels.sequence_logprobs(x, labels=LABELS.reshape(1, 3),
                                                                                temperature=0.8, backend=b),
                                      lambda: [_logits().reshape(1, 3, 7)]),
    "masked_mean_all": (lambda b, x: rlkernels.masked_mean(x, MASK_BT, backend=b), lambda: [torch.randn(3, 5)]),
    "masked_mean": (lambda b, x: rlkernels.masked_mean(x, MASK_BT, dim=1, backend=b), lambda: [torch.randn(3, 5)]),
    "ppo_loss": (lambda b, x: rlkernels.ppo_loss(x, X0, ADV, MASK_BT, backend=b), lambda: [torch.randn(3, 5) * 0.3]),
    "grpo_loss": (lambda b, x: rlkernels.grpo_loss(x, X0, ADV[:, 0], MASK_BT, ref_logprobs=X0 - 0.1, beta=0.5,
                                                   backend=b), lambda: [torch.randn(3, 5) * 0.3]),
    "value_loss": (lambda b, x: rlkernels.value_loss(x, X0, ADV, MASK_BT, clip=0.2, backend=b),
                   lambda: [torch.randn(3, 5) * 0.3]),
    "dpo_loss": (lambda b, a, c, d, e: rlkernels.dpo_loss(a, c, d, e, beta=0.5, backend=b),
                 lambda: [torch.randn(4) for _ in range(4)]),
    "dpo_sequence_loss": (lambda b, x, r: rlkernels.dpo_sequence_loss(x, r, MASK_2BT, beta=0.5, backend=b),
                          lambda: [torch.randn(4, 5), torch.randn(4, 5)]),
    "linear_ppo_loss": (lambda b, h, w: rlkernels.linear_ppo_loss(h, w, LINEAR_LABELS.reshape(2, 2), X0[:2, :2] - 2,
                                                                  ADV[:2, :2], backend=b),
                        lambda: [torch.randn(2, 2, 5), torch.randn(6, 5)]),
}
X0 = torch.randn(3, 5) * 0.3
ADV = torch.randn(3, 5)
for _kind in KL_KINDS:
    CASES[f"kl_penalty_{_kind}"] = (
        (lambda kind: lambda b, x, y: rlkernels.kl_penalty(x, y, kind, clamp=3.0 if kind == "k2" else None,
                                                            backend=b))(_kind),
        lambda: [torch.randn(3, 5), torch.randn(3, 5)])


# Public ops without a gradient on any backend (documented as such).
NOT_DIFFERENTIABLE = {"gae", "discounted_returns", "group_advantages", "masked_whiten", "pack_tensors",
                      "unpack_tensors", "gossip_mix"}


def test_the_table_covers_every_differentiable_public_op():
    ops = {name for name in rlkernels.ops.__all__} - NOT_DIFFERENTIABLE
    covered = {op for op in ops if any(case == op or case.startswith(op + "_") for case in CASES)}
    assert covered == ops, f"double backward untested for {sorted(ops - covered)}"
    for name in NOT_DIFFERENTIABLE:  # and those really give no gradient
        assert name in rlkernels.ops.__all__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_double_backward_matches_reference_or_raises(case, backend):
    fn, make = CASES[case]
    base = make()
    vectors = [torch.randn_like(t) for t in base]
    probe = _outputs(fn("reference", *[t.double().requires_grad_() for t in base]))
    weights = [torch.randn_like(y) for y in probe]

    truth_inputs = [t.double().requires_grad_() for t in base]
    truth_grads, truth_hv = hessian_vector(lambda *xs: fn("reference", *xs), truth_inputs, weights, vectors)

    inputs = [t.clone().requires_grad_() for t in base]
    try:
        grads, hv = hessian_vector(lambda *xs: fn(backend, *xs), inputs, weights, vectors)
    except RuntimeError as exc:
        assert backend != "reference" and UNSUPPORTED in str(exc) and "backend='reference'" in str(exc), exc
        # the first derivatives themselves are still right
        first = torch.autograd.grad(_scalar(_outputs(fn(backend, *inputs)), weights), inputs)
        for g, t in zip(first, truth_grads):
            assert_close(g, t, dtype=torch.float32)
        return
    for g, t in zip(grads, truth_grads):
        assert_close(g, t, dtype=torch.float32)
    for h, t in zip(hv, truth_hv):
        if t is None:
            assert h is None or not h.any()
            continue
        assert h is not None, "second derivative missing"
        assert_close(h, t, dtype=torch.float32)


# The losses that raise: which ones, so that a silent change shows up.
RAISES = {"ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "dpo_sequence_loss", "linear_ppo_loss"}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_which_ops_support_second_order(case, backend):
    fn, make = CASES[case]
    inputs = [t.requires_grad_() for t in make()]
    outputs = _outputs(fn(backend, *inputs))
    grads = torch.autograd.grad(_scalar(outputs, [1.0] * len(outputs)), inputs, create_graph=True)
    dot = sum(g.sum() for g in grads)
    if case in RAISES:
        with pytest.raises(RuntimeError, match=UNSUPPORTED):
            torch.autograd.grad(dot, inputs, allow_unused=True)
    else:
        torch.autograd.grad(dot, inputs, allow_unused=True)


def test_kl_hessian_vector_product_trpo_style():
    """The natural-gradient use: H v of the mean KL at the current policy (where the
    gradient is 0 but the Hessian, the Fisher matrix, is not)."""
    logits = _logits(4, 11).requires_grad_()
    for backend in BACKENDS:
        kl = rlkernels.kl_from_logits(logits, logits.detach(), backend=backend).mean()
        (grad,) = torch.autograd.grad(kl, logits, create_graph=True)
        v = torch.ones_like(logits)
        v[:, 0] = -3.0
        (hv,) = torch.autograd.grad((grad * v).sum(), logits)
        p = torch.softmax(logits.detach().double(), -1)
        # Fisher of the softmax: (diag(p) - p p^T) v per row, / rows for the mean
        expected = (p * v - p * (p * v).sum(-1, keepdim=True)) / logits.shape[0]
        assert hv.abs().max() > 1e-3
        assert_close(hv, expected, dtype=torch.float32)
