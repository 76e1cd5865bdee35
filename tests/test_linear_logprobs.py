"""linear_logprobs: against hidden @ weight.T + the reference (values and the
gradients of hidden, weight and bias), chunk sizes that divide neither N nor V,
ignored rows, low precision, opcheck, torch.compile and bad input."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlkernels
from rlkernels import reference
from rlkernels._library import BUILD_INFO
from rlkernels.ops import _chunked
from support import TRITON_ON_CPU, assert_close, low_precision_bound, tie_logits


def problem(N=37, H=16, V=101, dtype=torch.float32, bias=True, device="cpu"):
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) / H ** 0.5 * 3).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), device=device)
    labels[::5] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, g, gh, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    lp, ent = fn(h, w, labels, bias=b, entropy=True, **kw)
    (lp * g + ent * gh).sum().backward()
    return lp, ent, h.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, None, 1000, (7, 13), (40, 30), (5, 101)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_unfused_reference(backend_device, chunk_size, with_bias):
    backend, device = backend_device
    hidden, weight, bias, labels = problem(bias=with_bias, device=device)
    g, gh = torch.randn(37, device=device), torch.randn(37, device=device)
    ours = run(rlkernels.linear_logprobs, hidden, weight, bias, labels, g, gh, temperature=0.8,
               chunk_size=chunk_size, backend=backend)
    truth = run(reference.linear_logprobs, hidden.double(), weight.double(),
                bias.double() if bias is not None else None, labels, g.double(), gh.double(), temperature=0.8)
    for name, a, b in zip(["logprobs", "entropy", "hidden", "weight", "bias"], ours, truth):
        if b is None:
            assert a is None
            continue
        assert_close(a, b, dtype=torch.float32, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend_device, dtype):
    backend, device = backend_device
    hidden, weight, bias, labels = problem(N=41, H=32, V=300, dtype=dtype, device=device)
    g, gh = torch.randn(41, device=device), torch.randn(41, device=device)
    ours = run(rlkernels.linear_logprobs, hidden, weight, bias, labels, g, gh, chunk_size=9, backend=backend)
    truth = run(reference.linear_logprobs, hidden.double(), weight.double(), bias.double(), labels,
                g.double(), gh.double())

    def torch_same(h, w, lab, bias=None, entropy=True):  # the unfused computation, all in `dtype`
        logp = torch.log_softmax(h @ w.t() + bias, -1)
        valid = lab != -100
        picked = torch.where(valid, logp.gather(-1, torch.where(valid, lab, 0)[:, None])[:, 0], 0)
        return picked, torch.where(valid, -(logp.exp() * logp).sum(-1), 0)

    same = run(torch_same, hidden, weight, bias, labels, g.to(dtype), gh.to(dtype))
    for name, a, s, t in zip(["logprobs", "entropy", "hidden", "weight", "bias"], ours, same, truth):
        assert a.dtype == (torch.float32 if name in ("logprobs", "entropy") else dtype), name
        low_precision_bound(a, s, t)


def test_leading_dims_partial_grads_and_no_grad(backend_device):
    backend, device = backend_device
    hidden, weight, bias, labels = problem(N=24, device=device)
    h3, l3 = hidden.view(2, 12, 16), labels.view(2, 12)
    lp = rlkernels.linear_logprobs(h3, weight, l3, bias=bias, chunk_size=5, backend=backend)
    assert lp.shape == (2, 12)
    assert_close(lp, reference.linear_logprobs(h3.double(), weight.double(), l3, bias=bias.double()),
                 dtype=torch.float32)
    # frozen lm-head: only hidden gets a gradient
    h = hidden.clone().requires_grad_()
    rlkernels.linear_logprobs(h, weight, labels, chunk_size=5, backend=backend).sum().backward()
    hr = hidden.double().requires_grad_()
    reference.linear_logprobs(hr, weight.double(), labels).sum().backward()
    assert_close(h.grad, hr.grad, dtype=torch.float32)
    # only the weight
    w = weight.clone().requires_grad_()
    rlkernels.linear_logprobs(hidden, w, labels, chunk_size=5, backend=backend).sum().backward()
    wr = weight.double().requires_grad_()
    reference.linear_logprobs(hidden.double(), wr, labels).sum().backward()
    assert_close(w.grad, wr.grad, dtype=torch.float32)
    with torch.no_grad():
        out = rlkernels.linear_logprobs(hidden, weight, labels, backend=backend)
    assert not out.requires_grad


def test_all_rows_ignored_and_empty(backend_device):
    backend, device = backend_device
    hidden, weight, bias, labels = problem(N=6, device=device)
    labels[:] = -100
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp, ent = rlkernels.linear_logprobs(h, w, labels, bias=b, entropy=True, backend=backend)
    assert torch.equal(lp, torch.zeros(6, device=device)) and torch.equal(ent, torch.zeros(6, device=device))
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))
    empty = rlkernels.linear_logprobs(hidden[:0], weight, labels[:0], backend=backend)
    assert empty.shape == (0,)


def test_chunk_rows_and_tiles():
    assert _chunked.chunk_rows(100, 10, 30) == 25  # 4 balanced chunks instead of 30, 30, 30, 10
    assert _chunked.chunk_rows(100, 10, 1000) == 100
    assert _chunked.chunk_rows(5, 10, 1) == 1
    assert _chunked.chunk_rows(10_000, 50_000) * 50_000 * 4 <= _chunked.CHUNK_BYTES
    # vocabulary blocks of VOCAB_BLOCK whatever the batch; all tokens in one tile when they fit
    tokens, block = _chunked.lm_head_tiles(2048, 50257)
    assert (tokens, block) == (2048, _chunked.VOCAB_BLOCK) and tokens * block * 4 <= _chunked.CHUNK_BYTES
    tokens, block = _chunked.lm_head_tiles(100_000, 50257)
    assert block == _chunked.VOCAB_BLOCK and tokens * block * 4 <= _chunked.CHUNK_BYTES and tokens % 16 == 0
    assert _chunked.lm_head_tiles(10, 300) == (10, 300)
    # tiles continue the kernels' whole-row vocabulary chunks (kVocabChunk, the chunk rule)
    assert _chunked.VOCAB_BLOCK % BUILD_INFO["vocab_chunk"] == 0


@pytest.mark.parametrize("tiles", [(23, 50), (6, 50), (23, 7), (6, 7), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_chunking_helpers_compose(tiles, dtype):
    """The helpers the vocabulary-parallel ops build on: forward tiles in row order, and a
    tiled backward that equals autograd through the full matmul."""
    hidden, weight, bias, _ = problem(N=23, V=50, dtype=dtype)
    seen = []
    for t0, t1, v0, v1, logits in _chunked.tiled_logits(hidden, weight, bias, tiles):
        torch.testing.assert_close(logits, torch.addmm(bias[v0:v1], hidden[t0:t1], weight[v0:v1].t()))
        seen.append((t0, t1, v0, v1))
    chunk, block = tiles
    assert seen == [(t0, min(t0 + chunk, 23), v0, min(v0 + block, 50))
                    for t0 in range(0, 23, chunk) for v0 in range(0, 50, block)]
    upstream = torch.randn(23, 50)
    visited = torch.zeros(23, 50, dtype=torch.int64)

    def grad_logits(t0, t1, v0, v1, logits):
        visited[t0:t1, v0:v1] += 1
        return (upstream[t0:t1, v0:v1] * logits.float()).to(dtype)

    grads = _chunked.chunked_linear_backward(hidden, weight, bias, tiles, grad_logits)
    assert torch.equal(visited, torch.ones_like(visited))  # every logit exactly once
    def autograd(dt):
        h, w, b = (t.to(dt).requires_grad_() for t in (hidden, weight, bias))
        logits = h @ w.t() + b
        (0.5 * upstream.to(dt) * logits.square()).sum().backward()
        return h.grad, w.grad, b.grad

    truth = autograd(torch.float64)
    same = autograd(dtype)
    for ours, expected, torch_same, name in zip(grads, truth, same, ("hidden", "weight", "bias")):
        assert ours.dtype == dtype
        if dtype == torch.float32:
            assert_close(ours, expected, dtype=torch.float32, msg=name)
        else:
            low_precision_bound(ours, torch_same, expected)


def test_opcheck_and_compile():
    hidden, weight, bias, labels = problem(N=11, V=29)
    args = (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels, bias.clone().requires_grad_(),
            0.9, -100, True, True, 3, 10, 1 << 20, True, "cpu")
    torch.library.opcheck(torch.ops.rlkernels.linear_logprobs.default, args)
    if TRITON_ON_CPU:
        torch.library.opcheck(torch.ops.rlkernels.linear_logprobs.default, args[:-1] + ("triton",))
    lp, ent, saved, _ = torch.ops.rlkernels.linear_logprobs(*args[:-1], "cpu")
    torch.library.opcheck(torch.ops.rlkernels.linear_logprobs_backward.default,
                          (torch.randn(11), torch.randn(11), hidden, weight, labels, bias, saved.detach(),
                           ent.detach(), 0.9, -100, 3, 10, 1 << 20, True, "cpu", True, True, True))

    @torch.compile(fullgraph=True, backend="eager")
    def step(h, w):
        lp, ent = rlkernels.linear_logprobs(h, w, labels, bias=bias, entropy=True, chunk_size=4)
        return (lp + 0.1 * ent).sum()

    @torch.compile(fullgraph=True, backend="eager")
    def statistics(h, w):
        return rlkernels.linear_logprobs(h, w, labels, bias=bias, mean_logits=True, is_top1=True, chunk_size=4)

    compiled = statistics(hidden, weight)
    eager = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, mean_logits=True, is_top1=True, chunk_size=4)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    step(h, w).backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_r, ent_r = reference.linear_logprobs(hr, wr, labels, bias=bias, entropy=True)
    (lp_r + 0.1 * ent_r).sum().backward()
    assert_close(h.grad, hr.grad)
    assert_close(w.grad, wr.grad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight=torch.randn(20, 7)), ValueError, r"weight must have shape \[V, 8\]"),
    (dict(weight=torch.randn(20, 8, dtype=torch.float64)), TypeError, "weight must have the dtype of hidden"),
    (dict(weight=torch.randn(20)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(19)), ValueError, r"bias must have shape \[20\]"),
    (dict(bias=torch.randn(20, dtype=torch.float16)), TypeError, "bias must have the dtype of hidden"),
    (dict(labels=torch.tensor([0, 1, 20, 3, 4])), ValueError, r"labels must lie in \[0, 20\)"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must have the leading shape of hidden \(5,\)"),
    (dict(weight=torch.randn(20, 8, device="meta")), ValueError, "weight is on meta but hidden is on cpu"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(chunk_size=(4, 0)), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=(4, 5, 6)), ValueError, r"chunk_size must be an int or a \(tokens, vocabulary\) pair"),
    (dict(temperature=-2.0), ValueError, "temperature must be > 0.0"),
    (dict(hidden=torch.ones(5, 8, dtype=torch.int64)), TypeError, "hidden must have dtype"),
])
def test_bad_input(kwargs, error, match):
    args = dict(hidden=torch.randn(5, 8), weight=torch.randn(20, 8), labels=torch.tensor([0, 1, 2, 3, -100]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rlkernels.linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


# ---- linear_logprobs' forward and its vocabulary tiles (logprobs_vocab_tile: test_logprobs_vocab_tile.py)

def test_linear_logprobs_forward_equals_its_tiles():
    """linear_logprobs' CPU forward is the whole-row kernel on the very logits its tiles
    hold: bit for bit (the tiles are kBlock multiples)."""
    N, H, V = 40, 16, 5000
    hidden, weight, bias, labels = problem(N=N, H=H, V=V)
    lp, ent = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, entropy=True)
    logits = torch.empty(_chunked.padded_rows(N), V)
    for v0 in range(0, V, _chunked.VOCAB_BLOCK):  # the forward's tiles (all tokens fit one chunk)
        v1 = min(v0 + _chunked.VOCAB_BLOCK, V)
        block = torch.empty(_chunked.padded_rows(N), v1 - v0)
        logits[:, v0:v1] = 0
        logits[:N, v0:v1] = _chunked.row_logits(block, hidden, weight[v0:v1], bias[v0:v1])
    whole_lp, whole_ent, _ = torch.ops.rlkernels.logprobs(logits[:N], labels, 1.0, -100, True, False)
    assert torch.equal(lp, whole_lp) and torch.equal(ent, whole_ent)


def test_rollout_logprobs_match_linear_ppo_loss_across_vocabulary_tiles():
    """On the CPU, the tiled forward (several 4096-wide vocabulary blocks here) gives the
    log-probs linear_ppo_loss computes from full rows: an unchanged policy has ratio 1
    exactly, on any micro-batch."""
    N, H, V = 48, 32, 9000
    hidden, weight, _, labels = problem(N=N, H=H, V=V, bias=False)
    labels = labels.clamp(min=0)
    old = rlkernels.linear_logprobs(hidden, weight, labels)
    advantages = torch.randn(N)
    for rows in (slice(0, N), slice(5, 22), slice(40, 41)):
        _, stats = rlkernels.linear_ppo_loss(hidden[rows].unsqueeze(0), weight, labels[rows].unsqueeze(0),
                                             old[rows].unsqueeze(0), advantages[:1])
        assert float(stats["ratio_max"]) == 1.0 and float(stats["approx_kl_k1"]) == 0.0, stats


# ---- mean_logits and is_top1: the row statistics TRL's fused lm-head reports --------------------
def _as_linear(logits, dtype):
    """hidden, weight and bias whose lm-head gives `logits` exactly: weight is the identity
    and the bias a constant integer."""
    V = logits.shape[1]
    return (logits - 2).to(dtype), torch.eye(V, dtype=dtype, device=logits.device), torch.full(
        (V,), 2.0, dtype=dtype, device=logits.device)


def _float64_statistics(hidden, weight, bias, labels, temperature):
    logits = hidden.double() @ weight.double().t() + (bias.double() if bias is not None else 0)
    valid = labels != -100
    means = torch.where(valid, logits.mean(-1) / temperature, 0)
    first_max = logits.argmax(-1)  # the first of equal maxima
    return means, (first_max == labels) & valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, (5, 16), (16, 37), (3, 2)])
def test_is_top1_on_ties_against_float64(backend_device, dtype, chunk_size):
    """Exact ties before and after the label, inside its vocabulary tile and across
    tiles: is_top1 is argmax == label with the first maximum winning, on every backend."""
    backend, device = backend_device
    V = 96
    logits, labels = tie_logits(V, device)
    hidden, weight, bias = _as_linear(logits, dtype)
    means, top1 = _float64_statistics(hidden, weight, bias, labels, 0.5)
    kwargs = {} if backend == "reference" else {"chunk_size": chunk_size}
    lp, mean_logits, is_top1 = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.5,
                                                         mean_logits=True, is_top1=True, backend=backend, **kwargs)
    assert is_top1.dtype == torch.bool and mean_logits.dtype == torch.float32
    assert top1[:7].tolist() == [True, False, False, True, True, True, False]  # the designed rows are what they say
    assert torch.equal(is_top1, top1)
    assert_close(mean_logits, means, dtype=torch.float32)
    assert torch.equal(lp, rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.5,
                                                     backend=backend, **kwargs))


def test_is_top1_and_mean_logits_on_the_reference_backend():
    logits, labels = tie_logits(64, "cpu")
    hidden, weight, bias = _as_linear(logits, torch.float32)
    means, top1 = _float64_statistics(hidden, weight, bias, labels, 1.0)
    _, mean_logits, is_top1 = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, mean_logits=True,
                                                        is_top1=True, backend="reference")
    assert torch.equal(is_top1, top1)
    assert_close(mean_logits, means, dtype=torch.float32)


@pytest.mark.parametrize("with_bias", [True, False])
def test_mean_logits_against_float64(backend_device, with_bias):
    """Gaussian problems with a large common offset in the weight (the mean is then far
    from 0 and every logit large), float32: within the float32 tolerance of float64."""
    backend, device = backend_device
    hidden, weight, bias, labels = problem(N=29, H=24, V=333, bias=with_bias, device=device)
    weight = weight + 30.0
    means, top1 = _float64_statistics(hidden, weight, bias, labels, 0.7)
    out = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.7, entropy=True,
                                    mean_logits=True, is_top1=True, chunk_size=(8, 50), backend=backend)
    lp, ent, mean_logits, is_top1 = out
    assert_close(mean_logits, means, dtype=torch.float32)
    assert torch.equal(is_top1, top1)
    assert_close(lp, reference.linear_logprobs(hidden.double(), weight.double(), labels, temperature=0.7,
                                               bias=bias.double() if with_bias else None), dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mean_logits_low_precision(backend_device, dtype):
    """16-bit inputs: no worse than the mean of the logits PyTorch computes in that dtype."""
    backend, device = backend_device
    hidden, weight, bias, labels = problem(N=41, H=32, V=300, dtype=dtype, device=device)
    truth, _ = _float64_statistics(hidden, weight, bias, labels, 1.0)
    _, mean_logits = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, mean_logits=True, chunk_size=9,
                                               backend=backend)
    same = torch.where(labels != -100, (hidden @ weight.t() + bias).float().mean(-1), 0)
    low_precision_bound(mean_logits, same, truth)


def test_mean_logits_and_is_top1_carry_no_gradient_and_keep_it_for_the_rest():
    hidden, weight, bias, labels = problem(N=13, V=40)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent, mean_logits, is_top1 = rlkernels.linear_logprobs(h, w, labels, bias=bias, entropy=True,
                                                              mean_logits=True, is_top1=True)
    assert not mean_logits.requires_grad and not is_top1.requires_grad
    (lp + ent).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, ent2 = rlkernels.linear_logprobs(h2, w2, labels, bias=bias, entropy=True)
    (lp2 + ent2).sum().backward()
    assert torch.equal(h.grad, h2.grad) and torch.equal(w.grad, w2.grad)


def test_is_top1_nan_row_is_false(backend_device):
    backend, device = backend_device
    logits, labels = tie_logits(64, device)
    logits[0, 9] = float("nan")  # row 0's label (column 5) is the maximum of the finite logits
    hidden, weight, bias = _as_linear(logits, torch.float32)
    _, is_top1 = rlkernels.linear_logprobs(hidden, weight, labels, bias=bias, is_top1=True, backend=backend)
    assert not bool(is_top1[0]) and bool(is_top1[3])


class _Seen(TorchDispatchMode):
    """Passes every op through, recording its name (a dispatch mode also sends the C++
    autograd of linear_logprobs down the op path: the op itself, no kept tiles)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_eager_path_equals_the_op(dtype):
    """On plain eager tensors the C++ autograd runs the op's body itself (and may keep its
    tiles); under a dispatch mode (what torch.compile and fake tensors get) it runs the op
    and the backward op: the same bits, with ignored rows, entropy, is_top1 and a bias, in
    several tiles."""
    torch.manual_seed(3)
    hidden = torch.randn(2, 9, 16).to(dtype)
    weight, bias = torch.randn(40, 16).to(dtype), torch.randn(40).to(dtype)
    labels = torch.randint(0, 40, (2, 9))
    labels[1, 3:6] = -100
    upstream = (torch.randn(2, 9), torch.randn(2, 9))
    results = []
    for eager in (True, False):
        with contextlib.nullcontext() if eager else _Seen() as seen:
            params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            lp, ent, top1 = rlkernels.linear_logprobs(params[0], params[1], labels, bias=params[2], entropy=True,
                                                      is_top1=True, chunk_size=(5, 16))
            grads = torch.autograd.grad((lp, ent), params, upstream)
        if not eager:
            assert {"rlkernels.linear_logprobs", "rlkernels.linear_logprobs_backward"} <= set(seen.names)
        results.append((lp, ent, top1, *grads))
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


def _profiled(fn):
    """fn's result and the names of the ops it ran, inside C++ op bodies too (which a
    dispatch mode does not see into)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, [event.name for event in prof.events()]


def test_linear_logprobs_small_problem_keeps_its_tiles():
    """When all tiles fit the budget, the eager forward keeps them and the backward
    uses them instead of recomputing (no backward op, and only the gradient matmuls: fewer
    than a backward that recomputes the logits, and no more than two a tile): the same bits
    as recomputing (the op path, under a dispatch mode), and a second backward through
    the same graph (retain_graph) recomputes, since the first one turned the kept tiles
    into gradients in place."""
    torch.manual_seed(5)
    V = 2 * _chunked.VOCAB_BLOCK + 808  # 3 vocabulary blocks, the last one short
    hidden, weight, bias = torch.randn(3, 7, 16), torch.randn(V, 16) * 0.3, torch.randn(V)
    labels = torch.randint(0, V, (3, 7))
    labels[0, :3] = -100
    kept_rows = int((labels != -100).sum())
    chunk, block = _chunked.lm_head_tiles(kept_rows, V)
    tiles = -(-kept_rows // chunk) * -(-V // block)
    upstream = (torch.randn(3, 7), torch.randn(3, 7))
    results, matmuls = [], {}
    for keep in (True, False):
        params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with contextlib.nullcontext() if keep else _Seen():
            lp, ent = rlkernels.linear_logprobs(params[0], params[1], labels, bias=params[2], entropy=True)
        first, ran = _profiled(lambda: torch.autograd.grad((lp, ent), params, upstream, retain_graph=True))
        matmuls[keep] = sum(name in ("aten::mm", "aten::addmm", "aten::addmm_") for name in ran)
        if keep:  # grad hidden and grad weight: at most two matmuls a tile, none for its logits
            assert "rlkernels::linear_logprobs_backward" not in ran and 0 < matmuls[keep] <= 2 * tiles
        else:
            assert "rlkernels::linear_logprobs_backward" in ran
        with _Seen() as seen:
            second = torch.autograd.grad((lp, ent), params, upstream)
        assert "rlkernels.linear_logprobs_backward" in seen.names
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        results.append((lp, ent, *first))
    assert matmuls[True] < matmuls[False]  # the recomputing backward also redoes the logits
    for kept, recomputed_result in zip(*results):
        assert torch.equal(kept, recomputed_result)
