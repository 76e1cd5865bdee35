"""Off the happy path: inputs and uses where a kernel could return wrong numbers
without an error.  Each class is checked on every backend (cpu, triton, reference;
cuda where present): in-place gradients, outputs overlapping inputs, NaN in valid
positions, extreme temperatures and log-ratios, constant inputs of the losses, and
degenerate shapes."""
from __future__ import annotations

import math

import pytest
import torch

import rlkernels
from rlkernels import reference
from conftest import BACKEND_DEVICE, assert_close

KERNELS = [b for b, d in BACKEND_DEVICE if d == "cpu"]
ALL = KERNELS + ["reference"]


# ---- inplace_backward=True ----------------------------------------------------------------------

def _labels(n, vocab):
    return torch.randint(0, vocab, (n,))


@pytest.mark.parametrize("backend", KERNELS)
def test_inplace_backward_raises_when_another_op_saved_the_logits(backend):
    base = torch.randn(3, 7, requires_grad=True)
    logits = base * 1.0
    # the square is recorded first, so its backward runs after the in-place one
    loss = logits.square().sum() + rlkernels.logprobs(logits, _labels(3, 7), inplace_backward=True,
                                                      backend=backend).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", KERNELS)
def test_inplace_backward_raises_on_a_second_backward(backend):
    logits = torch.randn(3, 7, requires_grad=True) * 1.0
    out = rlkernels.logprobs(logits, _labels(3, 7), inplace_backward=True, backend=backend).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["expand_rows", "expand_vocab", "as_strided_overlap"])
def test_inplace_backward_on_overlapping_logits_is_right(backend, layout):
    """Elements sharing memory cannot hold one gradient each: the gradient is computed
    out of place there, and equals the reference's."""
    labels = _labels(4, 6)
    source = torch.randn(1, 6) if layout == "expand_rows" else torch.randn(4, 1) if layout == "expand_vocab" \
        else torch.randn(9)

    def view(t):
        if layout == "expand_rows":
            return t.expand(4, 6)
        if layout == "expand_vocab":
            return t.expand(4, 6)
        return t.as_strided((4, 6), (1, 1))  # row i starts at element i: rows overlap

    ours = source.clone().requires_grad_()
    rlkernels.logprobs(view(ours * 1.0), labels, inplace_backward=True, backend=backend).sum().backward()
    truth = source.double().requires_grad_()
    reference.logprobs(view(truth), labels).sum().backward()
    assert_close(ours.grad, truth.grad, dtype=torch.float32)


@pytest.mark.parametrize("backend", KERNELS)
def test_inplace_backward_still_writes_into_the_logits(backend):
    logits = torch.randn(3, 7)
    labels = _labels(3, 7)
    x = logits.clone().requires_grad_()
    buffer = x * 1.0
    rlkernels.logprobs(buffer, labels, inplace_backward=True, backend=backend).sum().backward()
    truth = logits.double().requires_grad_()
    reference.logprobs(truth, labels).sum().backward()
    assert_close(buffer.detach(), truth.grad, dtype=torch.float32)
    assert_close(x.grad, truth.grad, dtype=torch.float32)
