"""Bitwise results: the chunk rule of the CPU log-prob and KL kernels (single process)
and the exact mode of rlkernels.distributed.vocab_parallel (exact=True) on 2 and 4 gloo
ranks.  The chunk width is the real one (VOCAB_CHUNK = 8192 columns); shards start on
chunk edges with uneven sizes (three chunks, one, a short shard, none) and every
result is compared with torch.equal against the unsharded CPU op: log-probs, entropy,
gradients, the lm-head ops; labels in other shards and on chunk edges, ignore_index,
temperature, bf16, -inf chunks and huge logits."""
from __future__ import annotations

import functools

import pytest
import torch

import rlkernels
import vocab_parallel_checks as C
from property_support import bitwise_equal
from rlkernels.distributed import vocab_parallel as VP
from support import RankSuites

K = VP.VOCAB_CHUNK
# columns of each rank's shard, in rank order (the empty last one starts off the chunk edges)
SIZES = {2: [3 * K, K + 100], 4: [3 * K, K, 100, 0]}
SHAPE = (2, 4)


def _same(actual, expected, what):
    if not bitwise_equal(actual, expected):
        diff = (actual.double() - expected.double()).abs().nan_to_num(0).max().item() \
            if actual.shape == expected.shape else float("nan")
        raise AssertionError(f"{what}: not bitwise equal to the unsharded op (max difference {diff:g}, "
                             f"shapes {tuple(actual.shape)} / {tuple(expected.shape)})")


def _bounds(world, rank):
    sizes = SIZES[world]
    return sum(sizes[:rank]), sum(sizes[:rank + 1])


def _problem(g, vocab, dtype=torch.float32):
    """[2, 4, vocab] logits with adversarial rows and labels on chunk and shard edges."""
    x = 3 * torch.randn(*SHAPE, vocab, generator=g)
    x[0, 0, 5] = -float("inf")
    x[0, 1, :K] = -float("inf")        # a whole chunk of -inf (its maximum is -inf)
    x[0, 2] *= 2500                    # huge logits (+-1e4)
    x[1, 0, 3 * K + 7] = 40.0          # the row's maximum in a late chunk
    x[1, 1] -= 1e4                     # a large common offset
    labels = torch.randint(0, vocab, SHAPE, generator=g)
    labels[0, 0] = -100                # ignored
    labels[0, 1] = K                   # the first column of a chunk
    labels[0, 2] = vocab - 1           # the last shard's last column
    labels[1, 0] = 3 * K + 7
    labels[1, 1] = 0
    labels[1, 2] = K - 1
    labels[1, 3] = 3 * K               # the first column of the second shard
    return x.to(dtype), labels


# ---- the chunk rule, single process -------------------------------------------------------------

def _at_offset(row: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of `row` that starts `offset` elements into a fresh buffer (another alignment)."""
    buffer = torch.empty(row.numel() + 32, dtype=row.dtype)
    out = buffer[offset: offset + row.numel()].view(row.shape)
    out.copy_(row)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_rows_bits_do_not_depend_on_its_batch_or_address(dtype):
    g = torch.Generator().manual_seed(3)
    vocab = 2 * K + 300
    x, labels = _problem(g, 4 * K, dtype)
    x, labels = x.reshape(-1, 4 * K)[:, :vocab].contiguous(), labels.reshape(-1).clamp(max=vocab - 1)
    ref = torch.randn(x.shape, generator=g).to(dtype)
    lp, ent, saved = torch.ops.rlkernels.logprobs(x, labels, 0.7, -100, True, False)
    lp_only, _, _ = torch.ops.rlkernels.logprobs(x, labels, 0.7, -100, False, False)
    kl, kl_saved = torch.ops.rlkernels.kl_from_logits(x, ref, None, 1.3)
    for i in range(x.shape[0]):
        for offset in (0, 1, 3, 7):
            row, ref_row = _at_offset(x[i], offset)[None], _at_offset(ref[i], offset + 2)[None]
            alone = torch.ops.rlkernels.logprobs(row, labels[i: i + 1], 0.7, -100, True, False)
            for got, want, what in zip(alone, (lp, ent, saved), ("log-prob", "entropy", "saved")):
                _same(got[0], want[i], f"row {i} at offset {offset}: {what}")
            _same(torch.ops.rlkernels.logprobs(row, labels[i: i + 1], 0.7, -100, False, False)[0][0], lp_only[i],
                  f"row {i} at offset {offset}: log-prob without entropy")
            alone_kl = torch.ops.rlkernels.kl_from_logits(row, ref_row, None, 1.3)
            _same(alone_kl[0][0], kl[i], f"row {i} at offset {offset}: KL")
            _same(alone_kl[1][0], kl_saved[i], f"row {i} at offset {offset}: KL statistics")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [True, False])
def test_chunks_anywhere_fold_to_the_whole_rows_bits(dtype, entropy):
    """logprobs_vocab_tile's chunk-state mode: each chunk from its own buffer at another
    offset, in reverse order, then the fold: the whole-row forward's bits."""
    g = torch.Generator().manual_seed(4)
    vocab = 3 * K + 123
    x, labels = _problem(g, 4 * K, dtype)
    x, labels = x.reshape(-1, 4 * K)[:, :vocab].contiguous(), labels.reshape(-1).clamp(max=vocab - 1)
    n = x.shape[0]
    lp, ent, saved = torch.ops.rlkernels.logprobs(x, labels, 0.7, -100, entropy, False)
    state = torch.full((n, 4, 4), float("nan"))
    tile = torch.ops.rlkernels.logprobs_vocab_tile
    for c in reversed(range(4)):
        v0, v1 = c * K, min(vocab, (c + 1) * K)
        tile(_at_offset(x[:, v0:v1].contiguous(), 2 * c + 1), labels, state, 0.7, -100, v0, entropy, False)
    tile(x[:, :0], labels, state, 0.7, -100, vocab, entropy, True)
    _same(state[:, 0, 0], lp, "log-probs")
    if entropy:
        _same(state[:, 0, 1], ent, "entropy")
    _same(state[:, 0, 2:], saved, "saved (max, log-sum-exp)")


# ---- exact=True on gloo ranks -------------------------------------------------------------------

def check_logprobs(rank, world, *, dtype=torch.float32, temperature=0.7):
    g = torch.Generator().manual_seed(21)
    full, labels = _problem(g, sum(SIZES[world]), dtype)
    gl, gh = torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    v0, v1 = _bounds(world, rank)
    x = full.clone().requires_grad_(True)
    want_lp, want_h = rlkernels.logprobs(x, labels, temperature=temperature, entropy=True, backend="cpu")
    (want_lp * gl + want_h * gh).sum().backward()
    shard = full[..., v0:v1].clone().requires_grad_(True)
    lp, h = VP.logprobs(shard, labels, group=None, temperature=temperature, entropy=True, exact=True, timeout=60)
    (lp * gl + h * gh).sum().backward()
    _same(lp, want_lp.detach(), "log-probs")
    _same(h, want_h.detach(), "entropy")
    _same(shard.grad, x.grad[..., v0:v1], "gradient of the shard")
    # without entropy; the shard a strided view of the full logits
    lp_only = VP.logprobs(full[..., v0:v1], labels, group=None, temperature=temperature, exact=True, timeout=60)
    _same(lp_only, rlkernels.logprobs(full, labels, temperature=temperature, backend="cpu"), "log-probs alone")


def check_logprobs_bf16(rank, world):
    check_logprobs(rank, world, dtype=torch.bfloat16, temperature=1.0)


def check_logprobs_cold(rank, world):
    check_logprobs(rank, world, temperature=0.05)


def check_linear(rank, world, *, dtype=torch.float32):
    g = torch.Generator().manual_seed(22)
    vocab, H = sum(SIZES[world]), 8
    hidden = torch.randn(*SHAPE, H, generator=g).to(dtype)
    weight = (0.5 * torch.randn(vocab, H, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(vocab, generator=g)).to(dtype)
    _, labels = _problem(g, vocab)
    gl, gh = torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)
    v0, v1 = _bounds(world, rank)
    xh, xw, xb = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    want_lp, want_h = rlkernels.linear_logprobs(xh, xw, labels, bias=xb, temperature=0.9, entropy=True,
                                                backend="cpu")
    (want_lp * gl + want_h * gh).sum().backward()
    sh = hidden.clone().requires_grad_(True)
    sw, sb = weight[v0:v1].clone().requires_grad_(True), bias[v0:v1].clone().requires_grad_(True)
    lp, h = VP.linear_logprobs(sh, sw, labels, group=None, bias=sb, temperature=0.9, entropy=True, exact=True,
                               timeout=60)
    (lp * gl + h * gh).sum().backward()
    _same(lp, want_lp.detach(), "linear log-probs")
    _same(h, want_h.detach(), "linear entropy")
    _same(sw.grad, xw.grad[v0:v1], "weight shard gradient")
    _same(sb.grad, xb.grad[v0:v1], "bias shard gradient")
    # the hidden gradient sums the shards' parts in another order (docs/distributed.md)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    C._close(sh.grad, xh.grad, "hidden gradient", tol, tol)


def check_linear_bf16(rank, world):
    check_linear(rank, world, dtype=torch.bfloat16)


def check_linear_ppo_loss(rank, world):
    """The log-probs are the unsharded op's bits, so a policy scored with the unsharded
    linear_logprobs (a rollout) has ratio 1 exactly; the loss's tail (the composed
    policy loss here, the fused single-process kernel there) may round differently."""
    g = torch.Generator().manual_seed(23)
    vocab, H = sum(SIZES[world]), 8
    hidden, weight = torch.randn(*SHAPE, H, generator=g), 0.5 * torch.randn(vocab, H, generator=g)
    _, labels = _problem(g, vocab)
    adv = torch.randn(*SHAPE, generator=g)
    v0, v1 = _bounds(world, rank)
    rollout = rlkernels.linear_logprobs(hidden, weight, labels, backend="cpu")
    kwargs = dict(entropy_coef=0.01, clip_high=0.28, backend="cpu")
    want, want_stats = rlkernels.linear_ppo_loss(hidden, weight, labels, rollout, adv, **kwargs)
    loss, stats = VP.linear_ppo_loss(hidden, weight[v0:v1], labels, rollout, adv, group=None, exact=True, **kwargs)
    if float(stats["ratio_max"]) != 1.0 or float(stats["approx_kl_k1"]) != 0.0:
        raise AssertionError(f"an unchanged policy must have ratio 1 exactly: {stats}")
    C._close(loss, want, "linear_ppo_loss", 1e-6, 1e-7)
    for key in want_stats:
        C._close(stats[key], want_stats[key], f"stats[{key!r}]", 1e-6, 1e-7)


def check_two_collectives_without_check(rank, world):
    """check=False, vocab_start given: the header (which carries the shard sizes the fold
    needs) and one all_gather of [N, widest shard's chunks, 4] float32."""
    g = torch.Generator().manual_seed(24)
    full, labels = _problem(g, sum(SIZES[world]))
    v0, v1 = _bounds(world, rank)
    with C.counted_all_gathers() as calls:
        lp = VP.logprobs(full[..., v0:v1], labels, group=None, vocab_start=v0, check=False, exact=True)
    widest = max(-(-size // K) for size in SIZES[world])
    expected = [(torch.int64, (8,)), (torch.float32, (labels.numel(), widest, VP.CHUNK_STAT_WIDTH))]
    if calls != expected:
        raise AssertionError(f"expected the collectives {expected}, got {calls}")
    _same(lp, rlkernels.logprobs(full, labels, backend="cpu"), "log-probs with check=False")
    assert VP.traffic_bytes(labels.numel(), world, shard_chunks=widest) == \
        labels.numel() * widest * VP.CHUNK_STAT_WIDTH * 4 * (world - 1)


def check_shards_off_the_chunk_edges_raise(rank, world):
    shard = torch.randn(3, 10)  # rank r starts at 10 r
    C._expect_mismatch(lambda: VP.logprobs(shard, torch.tensor([0, 5, 9]), group=None, exact=True, timeout=60),
                       rf"exact=True needs every shard to start on a multiple of the vocabulary chunk \({K}")


def check_exact_needs_the_cpu_kernels(rank, world):
    try:
        VP.logprobs(torch.randn(3, 10), torch.tensor([0, 5, 9]), group=None, exact=True, backend="reference")
    except ValueError as exc:
        if "exact" not in str(exc):
            raise AssertionError(f"the error does not name exact: {exc}") from exc
        return
    raise AssertionError("exact=True with backend='reference' did not raise")


CHECKS = {name[len("check_"):]: fn for name, fn in list(globals().items()) if name.startswith("check_")}
SUITES = RankSuites(functools.partial(C.run_suite, checks=CHECKS), CHECKS, timeout_s=300, pg_timeout_s=60)


@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("world", [2, 4])
def test_exact_multi_rank(world, name):
    SUITES.check(world, name)
