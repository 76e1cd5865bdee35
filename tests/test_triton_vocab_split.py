"""The Triton log-prob and KL forwards over rows split into vocabulary chunks
(rlkernels/triton/_vocab.py, docs/gpu-kernels.md), reached at interpreter sizes by
lowering the chunk width: several chunks with odd remainders, chunks that hold no
finite logit, huge logits, 16-bit inputs, ignored and masked rows, strided rows,
gradients through the saved statistics, and bitwise batch invariance."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import DEVICES, assert_close, backends_for, low_precision_bound

triton_devices = [d for d in DEVICES if "triton" in backends_for(d)]
pytestmark = pytest.mark.skipif(not triton_devices, reason="no device runs the Triton kernels here")
LOW = [torch.bfloat16, torch.float16]
# (V, chunk): 3 chunks with a remainder of 13, 5 with an odd remainder, a row one past a chunk
SPLITS = [(141, 64), (301, 64), (65, 64), (97, 48)]


@pytest.fixture(params=triton_devices)
def device(request):
    return request.param


@pytest.fixture
def chunk_of(monkeypatch):
    from rlkernels.triton import _vocab

    def set_chunk(width: int) -> None:
        monkeypatch.setattr(_vocab, "VOCAB_CHUNK", width)
    return set_chunk


def adversarial(N, V, chunk, dtype, device):
    """Rows that stress the merge: a first chunk of -inf, -inf everywhere but the label
    (in the last chunk), huge logits, the maximum in the last chunk only, an offset."""
    x = torch.randn(N, V, device=device) * 3
    labels = torch.randint(0, V, (N,), device=device)
    x[1, :chunk] = -float("inf")
    labels[1] = (chunk + V) // 2
    x[2] = -float("inf")
    labels[2] = V - 1
    x[2, V - 1] = 2.0
    x[3] *= 3000
    x[4, -1] = 40.0
    x[5] -= 1e4
    labels[6] = -100
    return x.to(dtype), labels


def torch_same_dtype(logits, labels, temperature):
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != -100
    picked = logp.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    entropy = -(torch.where(logp.exp() > 0, logp.exp() * logp, 0)).sum(-1)
    return torch.where(valid, picked, 0), torch.where(valid, entropy, 0)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("V,chunk", SPLITS)
def test_split_logprobs_match_reference(device, chunk_of, V, chunk, dtype):
    chunk_of(chunk)
    logits, labels = adversarial(8, V, chunk, dtype, device)
    x = logits.clone().requires_grad_()
    lp, H = rlkernels.logprobs(x, labels, temperature=0.7, entropy=True, backend="triton")
    assert torch.equal(rlkernels.logprobs(logits, labels, temperature=0.7, backend="triton"), lp.detach())
    xr = logits.double().requires_grad_()
    lp_true, H_true = reference.logprobs(xr, labels, temperature=0.7, entropy=True)
    g, gh = torch.randn(8, device=device), torch.randn(8, device=device)
    (lp * g + H * gh).sum().backward()
    (lp_true * g + H_true * gh).sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(H).all() and torch.isfinite(x.grad).all()
    assert lp[6] == 0 and H[6] == 0 and torch.equal(x.grad[6], torch.zeros_like(x.grad[6]))
    if dtype == torch.float32:
        assert_close(lp, lp_true, msg="logprobs")
        assert_close(H, H_true, msg="entropy")
        assert_close(x.grad, xr.grad, msg="gradient")
    else:
        lp_same, H_same = torch_same_dtype(logits.float(), labels, 0.7)
        low_precision_bound(lp, lp_same, lp_true, floor=1e-4)
        low_precision_bound(H, H_same, H_true, floor=1e-4)
        low_precision_bound(x.grad, xr.grad.to(dtype), xr.grad, floor=1e-6)


def test_split_nan_and_out_of_range_labels(device, chunk_of):
    chunk_of(64)
    logits, labels = adversarial(8, 200, 64, torch.float32, device)
    logits[0, 150] = float("nan")  # in the third chunk only
    labels[7] = 200
    lp, H, _ = torch.ops.rlkernels.logprobs_triton(logits.to(device), labels, 1.0, -100, True, False)
    assert torch.isnan(lp[0]) and torch.isnan(H[0]) and torch.isnan(lp[7])
    assert torch.isfinite(lp[1:7]).all()


def test_split_agrees_with_the_whole_row(device, chunk_of):
    """The split changes only the order of the sums: the maximum is exact, the rest
    within float32 rounding of the one-program-per-row path."""
    logits, labels = adversarial(8, 301, 64, torch.float32, device)
    whole = torch.ops.rlkernels.logprobs_triton(logits, labels, 0.9, -100, True, False)
    chunk_of(64)
    split = torch.ops.rlkernels.logprobs_triton(logits, labels, 0.9, -100, True, False)
    assert torch.equal(split[2][:, 0], whole[2][:, 0])
    for ours, theirs in zip(split, whole):
        assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("V,chunk", SPLITS[:2])
def test_split_kl_matches_reference(device, chunk_of, V, chunk, dtype):
    chunk_of(chunk)
    a = torch.randn(7, V, device=device) * 2
    b = a + torch.randn(7, V, device=device)
    a[1, :chunk] = -float("inf")       # the policy's first chunk holds nothing
    b[2, :chunk] = -float("inf")
    a[2, :chunk] = -float("inf")       # both empty there
    a[3] *= 3000
    b[3] *= 3000
    b[4, V - 3] = -float("inf")        # the reference rules out a token the policy can sample: KL = inf
    a, b = a.to(dtype), b.to(dtype)
    mask = torch.ones(7, dtype=torch.bool, device=device)
    mask[5] = False
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    kl = rlkernels.kl_from_logits(x, y, temperature=0.8, mask=mask, backend="triton")
    truth = reference.kl_from_logits(a.double(), b.double(), temperature=0.8, mask=mask)
    assert kl[4] == float("inf") and truth[4] == float("inf") and kl[5] == 0
    finite = torch.isfinite(truth)
    g = torch.randn(7, device=device) * finite
    (torch.where(finite, kl, 0) * g).sum().backward()  # the inf row's gradient is NaN: not compared
    # closed forms: p (log p - log q - KL) / T and (q - p) / T, 0 where p = 0
    logp, logq = torch.log_softmax(a.double() / 0.8, -1), torch.log_softmax(b.double() / 0.8, -1)
    p, q = logp.exp(), logq.exp()
    scale = (g.double() * mask)[:, None] / 0.8
    grad_a = scale * torch.where(p > 0, p * (logp - logq - torch.where(finite, truth, 0)[:, None]), 0)
    grad_b = scale * (q - p)
    if dtype == torch.float32:
        assert_close(kl[finite], truth[finite])
        assert_close(x.grad[finite], grad_a[finite])
        assert_close(y.grad[finite], grad_b[finite])
    else:
        logp32 = torch.log_softmax(a.float() / 0.8, -1)
        logq32 = torch.log_softmax(b.float() / 0.8, -1)
        same = torch.where(logp32.exp() > 0, logp32.exp() * (logp32 - logq32), 0).sum(-1) * mask
        low_precision_bound(kl[finite], same[finite], truth[finite], floor=1e-4)
        low_precision_bound(x.grad[finite], grad_a[finite].to(dtype), grad_a[finite], floor=1e-6)
        low_precision_bound(y.grad[finite], grad_b[finite].to(dtype), grad_b[finite], floor=1e-6)


def test_split_kl_with_strided_reference(device, chunk_of):
    """Rows of the two models laid out differently (the reference a slice): the
    reference row is addressed apart from the policy's."""
    chunk_of(64)
    a = torch.randn(2, 3, 141, device=device)
    b = (a + torch.randn(2, 3, 141, device=device))
    b_wide = torch.randn(2, 4, 141, device=device)
    b_wide[:, 1:] = b
    kl = rlkernels.kl_from_logits(a, b_wide[:, 1:], backend="triton")
    assert_close(kl, reference.kl_from_logits(a.double(), b.double()))


@pytest.mark.parametrize("V,chunk", [(136, 64), (141, 64), (4099, 8192)])
def test_a_rows_result_does_not_depend_on_the_batch(device, chunk_of, V, chunk):
    """Bitwise: the split, the blocks and the merge order depend on V only, so a row
    keeps its bits in a batch of any size and wherever it sits (alone, at a row of
    another 16-byte phase when V is odd)."""
    chunk_of(chunk)
    logits, labels = adversarial(8, V, 64, torch.float32, device)
    ref = torch.randn_like(logits)
    full = torch.ops.rlkernels.logprobs_triton(logits, labels, 1.0, -100, True, False)
    kl_full = torch.ops.rlkernels.kl_from_logits_triton(logits, ref, None, 1.0)
    for rows in (slice(0, 1), slice(0, 3), slice(0, 8)):
        part = torch.ops.rlkernels.logprobs_triton(logits[rows].clone(), labels[rows].clone(), 1.0, -100, True, False)
        for ours, whole in zip(part, full):
            assert torch.equal(ours, whole[rows])
        kl_part = torch.ops.rlkernels.kl_from_logits_triton(logits[rows].clone(), ref[rows].clone(), None, 1.0)
        for ours, whole in zip(kl_part, kl_full):
            assert torch.equal(ours, whole[rows])
    for row in (3, 5, 7):
        alone = torch.ops.rlkernels.logprobs_triton(logits[row:row + 1].clone(), labels[row:row + 1].clone(), 1.0,
                                                    -100, True, False)
        for ours, whole in zip(alone, full):
            assert torch.equal(ours, whole[row:row + 1])
        kl_alone = torch.ops.rlkernels.kl_from_logits_triton(logits[row:row + 1].clone(), ref[row:row + 1].clone(),
                                                             None, 1.0)
        for ours, whole in zip(kl_alone, kl_full):
            assert torch.equal(ours, whole[row:row + 1])
    again = torch.ops.rlkernels.logprobs_triton(logits, labels, 1.0, -100, True, False)
    assert all(torch.equal(x, y) for x, y in zip(again, full))
