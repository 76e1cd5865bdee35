"""Memory shared between inputs and outputs, where a kernel could return wrong numbers
without an error, on every backend (cpu, triton, reference; cuda where present):
logprobs' in-place backward (inplace_backward=True) into logits that something else
holds, and outputs of pack_tensors, unpack_tensors and gossip_mix that overlap their
inputs."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import BACKEND_DEVICE, assert_close

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


# ---- outputs overlapping inputs -----------------------------------------------------------------

MIX = (0.5, 0.25, 0.25)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("operand", ["x", "left", "right"])
@pytest.mark.parametrize("shift", [1, -1, 9])
def test_gossip_mix_out_partially_overlapping_an_input_raises(backend, operand, shift):
    buffer = torch.randn(30)
    inputs = {"x": torch.randn(10), "left": torch.randn(10), "right": torch.randn(10)}
    inputs[operand] = buffer[10:20]
    out = buffer[10 + shift:20 + shift]
    before = buffer.clone()
    with pytest.raises(ValueError, match=f"out partially overlaps {operand}"):
        rlkernels.gossip_mix(inputs["x"], inputs["left"], inputs["right"], MIX, out=out, backend=backend)
    assert torch.equal(buffer, before)  # nothing written


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("operand", ["x", "left", "right"])
def test_gossip_mix_out_exactly_an_input_is_in_place(backend, operand):
    inputs = {name: torch.randn(4, 5) for name in ("x", "left", "right")}
    expected = reference.gossip_mix(inputs["x"], inputs["left"], inputs["right"], *MIX)
    out = inputs[operand]
    result = rlkernels.gossip_mix(inputs["x"], inputs["left"], inputs["right"], MIX, out=out, backend=backend)
    assert result is out and torch.equal(out, expected)


@pytest.mark.parametrize("backend", ALL)
def test_gossip_mix_overlap_of_a_non_contiguous_operand_is_fine(backend):
    # a strided input is read through a copy, so an out over its storage is safe
    storage = torch.randn(20)
    x = storage[::2]
    left, right = torch.randn(10), torch.randn(10)
    expected = reference.gossip_mix(x.clone(), left, right, *MIX)
    out = storage[10:]
    rlkernels.gossip_mix(x, left, right, MIX, out=out, backend=backend)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shift", [1, -1, 3])
def test_pack_tensors_out_overlapping_an_input_raises(backend, shift):
    buffer = torch.randn(20)
    first, second = buffer[5:9], buffer[9:12]
    out = buffer[5 + shift:12 + shift]
    before = buffer.clone()
    with pytest.raises(ValueError, match=r"out partially overlaps tensors\[0\]"):
        rlkernels.pack_tensors([first, second], out=out, backend=backend)
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("backend", ALL)
def test_pack_tensors_input_in_another_slot_raises(backend):
    bucket = torch.randn(6)
    with pytest.raises(ValueError, match=r"tensors\[0\]"):
        rlkernels.pack_tensors([bucket[3:6], bucket[0:3]], out=bucket, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_pack_tensors_inputs_already_in_their_slots(backend):
    bucket = torch.randn(7)
    expected = bucket * 0.5
    rlkernels.pack_tensors([bucket[:4].view(2, 2), bucket[4:]], out=bucket, scale=0.5, backend=backend)
    assert torch.equal(bucket, expected)


@pytest.mark.parametrize("backend", ALL)
def test_unpack_tensors_target_overlapping_the_bucket_raises(backend):
    storage = torch.randn(12)
    bucket = storage[:7]
    with pytest.raises(ValueError, match=r"tensors\[1\] partially overlaps bucket"):
        rlkernels.unpack_tensors(bucket, [torch.empty(4), storage[5:8]], backend=backend)
    with pytest.raises(ValueError, match=r"tensors\[1\] partially overlaps tensors\[0\]"):
        rlkernels.unpack_tensors(torch.randn(7), [storage[:4], storage[3:6]], backend=backend)


def _writes(op):
    def write(backend, target):
        if op == "unpack_tensors":
            rlkernels.unpack_tensors(torch.randn(4), [target], backend=backend)
        elif op == "pack_tensors":
            rlkernels.pack_tensors([torch.randn(4)], out=target, backend=backend)
        else:
            rlkernels.gossip_mix(target, torch.randn(4), torch.randn(4), MIX, out=target, backend=backend)
    return write


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("op", ["unpack_tensors", "pack_tensors", "gossip_mix"])
def test_ops_writing_in_place_bump_the_version(backend, op):
    """A tensor that a graph saved and an op then overwrote: backward must raise, as for
    any in-place PyTorch op, not compute with the new values."""
    buffer = torch.randn(4)
    x = torch.randn(4, requires_grad=True)
    loss = (x * buffer).sum()  # saves buffer for x's gradient
    before = buffer._version
    _writes(op)(backend, buffer)
    assert buffer._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---- negated views (torch._neg_view; the real view of a conjugated complex tensor is the
# other kind): their bytes are not their values, so a kernel must not write them directly

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("op", ["unpack_tensors", "pack_tensors", "gossip_mix"])
def test_ops_writing_into_a_negated_view_write_its_values(backend, op):
    g = torch.Generator().manual_seed(3)
    x, left, right = (torch.randn(6, generator=g) for _ in range(3))
    target = torch._neg_view(torch.zeros(6))
    if op == "unpack_tensors":
        rlkernels.unpack_tensors(x, [target], scale=0.5, backend=backend)
        expected = x * 0.5
    elif op == "pack_tensors":
        assert rlkernels.pack_tensors([x[:2], x[2:]], out=target, backend=backend) is target
        expected = x
    else:
        assert rlkernels.gossip_mix(x, left, right, MIX, out=target, backend=backend) is target
        expected = reference.gossip_mix(x, left, right, *MIX)
    assert target.is_neg()
    assert torch.equal(target.resolve_neg(), expected)


@pytest.mark.parametrize("backend", KERNELS)
def test_inplace_backward_into_a_negated_view_is_right(backend):
    """A negated view cannot hold the gradient in its bytes: the gradient is computed out
    of place there (it had tripped an internal assert of torch's negation fallback)."""
    labels = _labels(4, 6)
    source = torch.randn(4, 6)
    ours = source.clone().requires_grad_()
    rlkernels.logprobs(torch._neg_view(ours * 1.0), labels, inplace_backward=True, backend=backend).sum().backward()
    truth = source.double().requires_grad_()
    reference.logprobs(-truth, labels).sum().backward()
    assert_close(ours.grad, truth.grad, dtype=torch.float32)


@pytest.mark.parametrize("backend", ALL)
def test_gossip_mix_out_on_the_same_bytes_with_other_strides_raises(backend):
    """out and x start at the same address, both contiguous, but their strides differ on a
    size-1 dimension: not the same elements to the overlap rule, on every path."""
    p = torch.randn(3)
    x = p.view(3, 1).t()  # (1, 3), strides (1, 1)
    out = p.view(1, 3)  # (1, 3), strides (3, 1)
    with pytest.raises(ValueError, match="out partially overlaps x"):
        rlkernels.gossip_mix(x, torch.randn(1, 3), torch.randn(1, 3), MIX, out=out, backend=backend)
