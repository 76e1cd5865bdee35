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


# ---- boundaries -----------------------------------------------------------------------------------

def _positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


def test_position_ids_give_the_cu_seqlens():
    lengths = [3, 1, 4]
    pk = _packed.packing("t", "x", torch.zeros(8), None, _positions(lengths), None)
    ref = _packed.packing("t", "x", torch.zeros(8), cu_of(lengths), None, None)
    assert pk.num_seqs == 3 and pk.max_seqlen == 4
    assert torch.equal(pk.flat, ref.flat) and torch.equal(pk.valid, ref.valid) and torch.equal(pk.src, ref.src)
    out = rlkernels.discounted_returns(torch.ones(1, 8), position_ids=_positions(lengths).unsqueeze(0))
    assert out.tolist() == [[3.0, 2.0, 1.0, 1.0, 4.0, 3.0, 2.0, 1.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_wider_max_seqlen_and_empty_batches(backend):
    torch.manual_seed(11)
    total = sum(LENGTHS)
    x = torch.randn(total)
    out = rlkernels.sequence_logprobs(x, cu_seqlens=cu_of(LENGTHS), max_seqlen=8, backend=backend)
    assert torch.equal(out, rlkernels.sequence_logprobs(pad(x, LENGTHS, 8), valid(LENGTHS, 8), backend=backend))
    # no sequences at all, and sequences that are all empty
    assert rlkernels.sequence_logprobs(torch.zeros(0), cu_seqlens=cu_of([]), backend=backend).shape == (0,)
    out = rlkernels.sequence_logprobs(torch.zeros(0), cu_seqlens=cu_of([0, 0]), max_seqlen=3, backend=backend)
    assert out.tolist() == [0.0, 0.0]
    adv, _ = rlkernels.gae(torch.zeros(1, 0), torch.zeros(1, 0), cu_seqlens=cu_of([0]), backend=backend)
    assert adv.shape == (1, 0)


def test_checked_mode_switch(monkeypatch):
    monkeypatch.delenv(_packed.CHECK_ENV, raising=False)
    assert _packed._read_values(torch.device("cpu"))
    assert not _packed._read_values(torch.device("cuda"))  # a host sync: checked mode only
    monkeypatch.setenv(_packed.CHECK_ENV, "1")
    assert _packed._read_values(torch.device("cuda"))


def _calls():
    """Each packed op as a function of (cu_seqlens, position_ids, max_seqlen) over 6 tokens."""
    x = torch.randn(6)
    return {
        "gae": lambda **kw: rlkernels.gae(x, x, **kw),
        "discounted_returns": lambda **kw: rlkernels.discounted_returns(x, **kw),
        "sequence_logprobs": lambda **kw: rlkernels.sequence_logprobs(x, **kw),
        "ppo_loss": lambda **kw: rlkernels.ppo_loss(x, x, x, **kw),
        "grpo_loss": lambda **kw: rlkernels.grpo_loss(x, x, x, **kw),
        "value_loss": lambda **kw: rlkernels.value_loss(x, x, x, **kw),
    }


BAD = {
    "starts above 0": (dict(cu_seqlens=torch.tensor([1, 3, 6])), ValueError, "cu_seqlens must start at 0"),
    "decreasing": (dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "cu_seqlens must be nondecreasing"),
    "short end": (dict(cu_seqlens=torch.tensor([0, 3, 5])), ValueError, "cu_seqlens must end at the packed length"),
    "long end": (dict(cu_seqlens=torch.tensor([0, 3, 7])), ValueError, "cu_seqlens must end at the packed length"),
    "float dtype": (dict(cu_seqlens=torch.tensor([0.0, 3.0, 6.0])), TypeError, "cu_seqlens must have dtype"),
    "2-D": (dict(cu_seqlens=torch.tensor([[0, 3, 6]])), ValueError, "cu_seqlens must be 1-D"),
    "empty": (dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens must be 1-D"),
    "device": (dict(cu_seqlens=torch.tensor([0, 3, 6], device="meta")), ValueError, "cu_seqlens is on meta"),
    "not a tensor": (dict(cu_seqlens=[0, 3, 6]), TypeError, "cu_seqlens must be a torch.Tensor"),
    "position_ids not at 0": (dict(position_ids=torch.tensor([1, 2, 0, 1, 2, 3])), ValueError, "position_ids must"),
    "position_ids jump": (dict(position_ids=torch.tensor([0, 1, 3, 0, 1, 2])), ValueError, "position_ids must"),
    "position_ids shape": (dict(position_ids=torch.arange(5)), ValueError, "position_ids must have"),
    "position_ids dtype": (dict(position_ids=torch.arange(6.0)), TypeError, "position_ids must have dtype"),
    "both": (dict(cu_seqlens=torch.tensor([0, 6]), position_ids=torch.arange(6)), ValueError, "not both"),
    "short max_seqlen": (dict(cu_seqlens=torch.tensor([0, 2, 6]), max_seqlen=3), ValueError, "max_seqlen 3"),
    "max_seqlen type": (dict(cu_seqlens=torch.tensor([0, 2, 6]), max_seqlen=3.0), TypeError, "max_seqlen must"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("op", sorted(_calls()))
def test_bad_boundaries(op, case):
    kwargs, error, message = BAD[case]
    with pytest.raises(error, match=message) as info:
        _calls()[op](**kwargs)
    assert op in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_packed_tensors(backend):
    x, cu = torch.randn(6), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="gae: last_values must have shape \\[2\\]"):
        rlkernels.gae(x, x, last_values=torch.zeros(3), cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="values must have the packed token shape"):
        rlkernels.gae(x, torch.randn(5), cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="mask must have shape"):
        rlkernels.ppo_loss(x, x, x, torch.ones(5, dtype=torch.bool), cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="a packed logprobs must be"):
        rlkernels.ppo_loss(torch.randn(2, 3), x, x, cu_seqlens=cu, backend=backend)
    with pytest.raises(TypeError, match="old_logprobs must have dtype"):
        rlkernels.ppo_loss(x, torch.zeros(6, dtype=torch.long), x, cu_seqlens=cu, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_packed_path_needs_no_host_sync(backend, monkeypatch):
    # With max_seqlen given and the checked mode off, a packed call never reads device
    # values back; the result is the padded one (compiled CUDA kernels and Triton alike).
    monkeypatch.delenv(_packed.CHECK_ENV, raising=False)
    if backend == "triton" and not rlkernels.HAS_TRITON:
        pytest.skip("triton is not importable")
    torch.manual_seed(12)
    total, S, L = sum(LENGTHS), len(LENGTHS), max(LENGTHS)
    lp = torch.randn(total, device="cuda", requires_grad=True)
    old, adv = torch.randn(total, device="cuda"), torch.randn(S, device="cuda")
    mask = torch.rand(total, device="cuda") > 0.2
    cu = cu_of(LENGTHS).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = rlkernels.ppo_loss(lp, old, adv, mask, agg="seq-mean-token-mean", cu_seqlens=cu, max_seqlen=L,
                                     backend=backend)
        (grad,) = torch.autograd.grad(loss, lp)
        adv_t, _ = rlkernels.gae(old, old, mask, cu_seqlens=cu, max_seqlen=L, backend=backend)
        seq = rlkernels.sequence_logprobs(old, mask, cu_seqlens=cu, max_seqlen=L, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lpp = pad(lp.detach(), LENGTHS).requires_grad_()
    m = pad(mask, LENGTHS, fill=False)
    padded, _ = rlkernels.ppo_loss(lpp, pad(old, LENGTHS), adv, m, agg="seq-mean-token-mean", backend=backend)
    (grad_p,) = torch.autograd.grad(padded, lpp)
    assert torch.equal(loss, padded) and torch.equal(grad, unpad(grad_p, LENGTHS))
    assert torch.equal(adv_t, unpad(rlkernels.gae(pad(old, LENGTHS), pad(old, LENGTHS), m, backend=backend)[0],
                                    LENGTHS))
    assert torch.equal(seq, rlkernels.sequence_logprobs(pad(old, LENGTHS), m, backend=backend))


def test_packed_batch_example(capsys):
    from test_examples import load

    module = load("packed_batch")
    assert module.__doc__ and "rlkernels" in module.__doc__
    row = module.main(["--device", "cpu", "--seqs", "4", "--max-len", "12", "--vocab", "11"])
    assert row["same_loss"] and row["same_sequence_logprobs"]
    assert row["tokens"] <= row["padded_slots"]
    assert "equal: True" in capsys.readouterr().out


def test_bench_cases_run_and_report_the_padding():
    from rlkernels.benchmarks import FAMILIES, packed

    assert FAMILIES["packed"] == "rlkernels.benchmarks.packed"
    cases = packed.cases("cpu", quick=True)
    assert {c.name.split()[0] for c in cases} == {"grpo_loss", "sequence_logprobs", "gae"}
    for case in cases:
        p = case.params
        assert p["tokens"] < p["padded_slots"] == p["tokens_processed"]
        assert [impl.label for impl in case.impls] == ["padded", "packed"]
        padded, ours = (impl.fn() for impl in case.impls)
        assert len(padded) == len(ours) and all(torch.isfinite(t).all() for t in (*padded, *ours))
    lengths = packed.grpo_lengths(64, 16, 4096)
    assert min(lengths) >= 16 and max(lengths) <= 4096 and lengths == packed.grpo_lengths(64, 16, 4096)
