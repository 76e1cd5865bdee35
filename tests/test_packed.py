"""Packed (padding-free) batches: cu_seqlens / position_ids on the ops whose result
depends on sequence boundaries give what the padded batch of the same sequences gives
(bit for bit: the packed path runs the padded kernel on the same grid), on every backend,
with gradients; bad boundaries raise errors naming the argument."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels.ops import _packed

BACKENDS = ["cpu", "reference"] + (["triton"] if rlkernels.HAS_TRITON and rlkernels._library.triton_interpreting()
                                   else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LENGTHS = [3, 0, 1, 5, 2, 1]  # a length-0 and two length-1 sequences


def cu_of(lengths, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype)


def random_lengths(seed: int, count: int = 5, top: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, top + 1, (count,), generator=g).tolist()


def pad(x: torch.Tensor, lengths, width=None, fill=0):
    """Packed [total, ...] -> [S, width, ...], written independently of the library."""
    width = max(lengths, default=0) if width is None else width
    out = x.new_full((len(lengths), width, *x.shape[1:]), fill)
    start = 0
    for s, n in enumerate(lengths):
        out[s, :n] = x[start:start + n]
        start += n
    return out


def unpad(y: torch.Tensor, lengths):
    return torch.cat([y[s, :n] for s, n in enumerate(lengths)]) if lengths else y.reshape(0, *y.shape[2:])


def valid(lengths, width=None):
    width = max(lengths, default=0) if width is None else width
    return torch.arange(width) < torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)


def layout(x, row: bool):
    return x.unsqueeze(0) if row else x


def randn(n, dtype=torch.float32, *rest):
    return torch.randn(n, *rest).to(dtype)


# ---- advantages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("row", [False, True], ids=["flat", "row"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gae(backend, dtype, row):
    torch.manual_seed(1)
    total = sum(LENGTHS)
    r, v = randn(total, dtype), randn(total, dtype)
    m = torch.rand(total) > 0.2
    last = torch.randn(len(LENGTHS))
    adv, ret = rlkernels.gae(layout(r, row), layout(v, row), layout(m, row), last_values=last, gamma=0.9, lam=0.8,
                             cu_seqlens=cu_of(LENGTHS), backend=backend)
    assert adv.shape == ret.shape == layout(r, row).shape
    pa, pr = rlkernels.gae(pad(r, LENGTHS), pad(v, LENGTHS), pad(m, LENGTHS, fill=False) & valid(LENGTHS),
                           last_values=last, gamma=0.9, lam=0.8, backend=backend)
    assert torch.equal(adv.reshape(-1), unpad(pa, LENGTHS))
    assert torch.equal(ret.reshape(-1), unpad(pr, LENGTHS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_no_carry_across_a_boundary(backend):
    # Two sequences of ones: each sequence's advantage starts afresh (no bootstrap, no carry).
    r, v = torch.ones(5), torch.zeros(5)
    adv, _ = rlkernels.gae(r, v, cu_seqlens=cu_of([2, 3]), backend=backend)
    assert adv.tolist() == [2.0, 1.0, 3.0, 2.0, 1.0]
    # dones inside a packed sequence still end an episode there.
    adv, _ = rlkernels.gae(r, v, dones=torch.tensor([0, 0, 1, 0, 0]), cu_seqlens=cu_of([2, 3]), backend=backend)
    assert adv.tolist() == [2.0, 1.0, 1.0, 2.0, 1.0]


@pytest.mark.parametrize("row", [False, True], ids=["flat", "row"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_discounted_returns(backend, dtype, row):
    torch.manual_seed(2)
    lengths = random_lengths(3)
    total = sum(lengths)
    r = randn(total, dtype)
    m = torch.rand(total) > 0.3
    out = rlkernels.discounted_returns(layout(r, row), layout(m, row), gamma=0.95, cu_seqlens=cu_of(lengths),
                                       backend=backend)
    padded = rlkernels.discounted_returns(pad(r, lengths), pad(m, lengths, fill=False), gamma=0.95, backend=backend)
    assert out.shape == layout(r, row).shape
    assert torch.equal(out.reshape(-1), unpad(padded, lengths))


def test_discounted_returns_values():
    out = rlkernels.discounted_returns(torch.ones(4), cu_seqlens=cu_of([1, 0, 3]), gamma=0.5)
    assert out.tolist() == [1.0, 1.75, 1.5, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_is_global(backend):
    # masked_whiten normalises over all valid tokens of the batch: packing changes only the
    # order of the reduction, so it takes no cu_seqlens and agrees with the padded batch.
    torch.manual_seed(3)
    total = sum(LENGTHS)
    x, m = torch.randn(total), torch.rand(total) > 0.2
    packed = rlkernels.masked_whiten(x, m, backend=backend)
    padded = rlkernels.masked_whiten(pad(x, LENGTHS), pad(m, LENGTHS, fill=False), backend=backend)
    torch.testing.assert_close(packed, unpad(padded, LENGTHS), rtol=1e-6, atol=1e-6)


# ---- sequence sums and DPO ------------------------------------------------------------------------

@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("row", [False, True], ids=["flat", "row"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs(backend, dtype, row, average):
    torch.manual_seed(4)
    total = sum(LENGTHS)
    x = randn(total, dtype).requires_grad_()
    m = torch.rand(total) > 0.2
    out = rlkernels.sequence_logprobs(layout(x, row), layout(m, row), average=average, cu_seqlens=cu_of(LENGTHS),
                                      backend=backend)
    g = torch.randn(len(LENGTHS))
    (grad,) = torch.autograd.grad(out, x, g)
    xp = pad(x.detach(), LENGTHS).requires_grad_()
    ref = rlkernels.sequence_logprobs(xp, pad(m, LENGTHS, fill=False), average=average, backend=backend)
    (grad_p,) = torch.autograd.grad(ref, xp, g)
    assert out.shape == (len(LENGTHS),)
    assert torch.equal(out, ref)
    assert torch.equal(grad, unpad(grad_p, LENGTHS))


@pytest.mark.parametrize("row", [False, True], ids=["flat", "row"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_from_logits(backend, row):
    torch.manual_seed(5)
    total, V = sum(LENGTHS), 7
    logits = torch.randn(total, V, requires_grad=True)
    labels = torch.randint(0, V, (total,))
    labels[2] = -100
    out = rlkernels.sequence_logprobs(layout(logits, row), labels=layout(labels, row), cu_seqlens=cu_of(LENGTHS),
                                      backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    lp = pad(logits.detach(), LENGTHS).requires_grad_()
    ref = rlkernels.sequence_logprobs(lp, labels=pad(labels, LENGTHS, fill=-100), backend=backend)
    (grad_p,) = torch.autograd.grad(ref.sum(), lp)
    assert torch.equal(out, ref)
    assert torch.equal(grad, unpad(grad_p, LENGTHS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_from_packed_sequence_sums(backend):
    # Chosen and rejected completions packed alternately: the sequence sums of the packed
    # row, split by index, are dpo_loss's inputs.
    torch.manual_seed(6)
    lengths = [2, 3, 1, 4]  # (chosen, rejected) x 2 pairs
    total = sum(lengths)
    policy = torch.randn(total, requires_grad=True)
    ref = torch.randn(total)
    cu = cu_of(lengths)
    ps = rlkernels.sequence_logprobs(policy, cu_seqlens=cu, backend=backend)
    rs = rlkernels.sequence_logprobs(ref, cu_seqlens=cu, backend=backend)
    losses, _, _ = rlkernels.dpo_loss(ps[0::2], ps[1::2], rs[0::2], rs[1::2], backend=backend)
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    pp = pad(policy.detach(), lengths).requires_grad_()
    pps = rlkernels.sequence_logprobs(pp, valid(lengths), backend=backend)
    prs = rlkernels.sequence_logprobs(pad(ref, lengths), valid(lengths), backend=backend)
    padded, _, _ = rlkernels.dpo_loss(pps[0::2], pps[1::2], prs[0::2], prs[1::2], backend=backend)
    (grad_p,) = torch.autograd.grad(padded.sum(), pp)
    assert torch.equal(losses, padded)
    assert torch.equal(grad, unpad(grad_p, lengths))


def _positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


# ---- token losses ---------------------------------------------------------------------------------

def _same_loss(packed, padded, grad, grad_p, lengths):
    (loss, stats), (loss_p, stats_p) = packed, padded
    assert torch.equal(loss, loss_p)
    assert stats.keys() == stats_p.keys()
    for name in stats:
        assert torch.equal(stats[name], stats_p[name]), name
    assert torch.equal(grad.reshape(-1), unpad(grad_p, lengths))


@pytest.mark.parametrize("per_seq", [False, True], ids=["token-adv", "seq-adv"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss(backend, dtype, agg, per_seq):
    torch.manual_seed(7)
    total, S = sum(LENGTHS), len(LENGTHS)
    lp = randn(total, dtype).requires_grad_()
    old = randn(total, dtype) * 0.1 + lp.detach()
    adv = torch.randn(S).to(dtype) if per_seq else randn(total, dtype)
    w = torch.rand(total).to(dtype)
    m = torch.rand(total) > 0.2
    kw = dict(agg=agg, dual_clip=3.0, backend=backend)
    packed = rlkernels.ppo_loss(lp.unsqueeze(0), old.unsqueeze(0), adv if per_seq else adv.unsqueeze(0),
                                m.unsqueeze(0), weights=w.unsqueeze(0), cu_seqlens=cu_of(LENGTHS), **kw)
    (grad,) = torch.autograd.grad(packed[0], lp)
    lpp = pad(lp.detach(), LENGTHS).requires_grad_()
    padded = rlkernels.ppo_loss(lpp, pad(old, LENGTHS), adv if per_seq else pad(adv, LENGTHS),
                                pad(m, LENGTHS, fill=False), weights=pad(w, LENGTHS), **kw)
    (grad_p,) = torch.autograd.grad(padded[0], lpp)
    _same_loss(packed, padded, grad, grad_p, LENGTHS)


@pytest.mark.parametrize("counts", [dict(num_tokens=37.0), dict(num_seqs=9.0), dict(norm_length=11.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_global_counts(backend, counts):
    torch.manual_seed(8)
    total = sum(LENGTHS)
    lp = torch.randn(total, requires_grad=True)
    old, adv = torch.randn(total), torch.randn(total)
    agg = {"num_tokens": "token-mean", "num_seqs": "seq-mean-token-mean", "norm_length": "seq-mean-token-sum-norm"}
    kw = dict(agg=agg[next(iter(counts))], backend=backend, **counts)
    packed = rlkernels.ppo_loss(lp, old, adv, cu_seqlens=cu_of(LENGTHS), **kw)
    (grad,) = torch.autograd.grad(packed[0], lp)
    lpp = pad(lp.detach(), LENGTHS).requires_grad_()
    padded = rlkernels.ppo_loss(lpp, pad(old, LENGTHS), pad(adv, LENGTHS), valid(LENGTHS), **kw)
    (grad_p,) = torch.autograd.grad(padded[0], lpp)
    _same_loss(packed, padded, grad, grad_p, LENGTHS)


@pytest.mark.parametrize("boundaries", ["cu_seqlens", "position_ids"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss(backend, dtype, loss_type, boundaries):
    torch.manual_seed(9)
    # position_ids cannot write a length-0 sequence
    lengths = LENGTHS if boundaries == "cu_seqlens" else [n for n in LENGTHS if n]
    total, S = sum(lengths), len(lengths)
    lp = randn(total, dtype).requires_grad_()
    old, ref = randn(total, dtype), randn(total, dtype)
    adv = torch.randn(S).to(dtype)
    kw = dict(beta=0.04, loss_type=loss_type, clip_high=0.28, num_seqs=4.0 if loss_type == "grpo" else None,
              backend=backend)
    where = {"cu_seqlens": cu_of(lengths)} if boundaries == "cu_seqlens" else {"position_ids": _positions(lengths)}
    packed = rlkernels.grpo_loss(lp, old, adv, ref_logprobs=ref, **where, **kw)
    (grad,) = torch.autograd.grad(packed[0], lp)
    lpp = pad(lp.detach(), lengths).requires_grad_()
    padded = rlkernels.grpo_loss(lpp, pad(old, lengths), adv, valid(lengths), ref_logprobs=pad(ref, lengths), **kw)
    (grad_p,) = torch.autograd.grad(padded[0], lpp)
    _same_loss(packed, padded, grad, grad_p, lengths)


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss(backend, dtype, agg, clip):
    torch.manual_seed(10)
    total = sum(LENGTHS)
    v = randn(total, dtype).requires_grad_()
    old, ret = randn(total, dtype), randn(total, dtype)
    m = torch.rand(total) > 0.2
    kw = dict(clip=clip, agg=agg, backend=backend)
    packed = rlkernels.value_loss(v, old, ret, m, cu_seqlens=cu_of(LENGTHS, torch.int64), **kw)
    (grad,) = torch.autograd.grad(packed[0], v)
    vp = pad(v.detach(), LENGTHS).requires_grad_()
    padded = rlkernels.value_loss(vp, pad(old, LENGTHS), pad(ret, LENGTHS), pad(m, LENGTHS, fill=False), **kw)
    (grad_p,) = torch.autograd.grad(padded[0], vp)
    _same_loss(packed, padded, grad, grad_p, LENGTHS)
