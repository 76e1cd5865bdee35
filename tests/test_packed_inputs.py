"""Packed batches: boundaries given as position_ids or a wider max_seqlen, empty
batches, the checked mode, bad boundaries (errors naming the argument), the CUDA path
without host syncs, the bench cases and the example script.  Shared helpers and the
equality tests are in test_packed.py."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels.ops import _packed
from test_packed import BACKENDS, LENGTHS, _positions, cu_of, pad, unpad, valid


# ---- boundaries -----------------------------------------------------------------------------------

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


def test_checked_mode_switch():
    with rlkernels.checked(False):
        assert _packed._read_values(torch.device("cpu"))
        assert not _packed._read_values(torch.device("cuda"))  # a host sync: checked mode only
    with rlkernels.checked():
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
    monkeypatch.setattr(rlkernels._checkmode, "_enabled", False)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_has_a_zero_gradient(backend):
    lp = torch.zeros(0, requires_grad=True)
    loss, _ = rlkernels.ppo_loss(lp, torch.zeros(0), torch.zeros(2), cu_seqlens=cu_of([0, 0]), backend=backend)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.shape == (0,) and loss.item() == 0.0


def test_packed_call_compiles():
    # torch.compile traces the packed path (the value checks are skipped while compiling)
    cu = cu_of(LENGTHS)
    lp, old, adv = torch.randn(sum(LENGTHS), requires_grad=True), torch.randn(sum(LENGTHS)), torch.randn(len(LENGTHS))

    def loss(lp, old, adv, cu):
        return rlkernels.ppo_loss(lp, old, adv, agg="seq-mean-token-mean", cu_seqlens=cu, max_seqlen=max(LENGTHS),
                                  backend="cpu")[0]

    compiled = torch.compile(loss)(lp, old, adv, cu)
    eager = loss(lp, old, adv, cu)
    assert torch.equal(compiled, eager)
    assert torch.equal(torch.autograd.grad(compiled, lp)[0], torch.autograd.grad(eager, lp)[0])
