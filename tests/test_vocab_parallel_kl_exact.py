"""KL's exact mode: kl_vocab_tile (per-chunk KL statistics, the fold with finish) against
the unsharded CPU kernel bit for bit, its Triton twin and bad input (single process), and
rlkernels.distributed.vocab_parallel.kl_from_logits(exact=True) on 2 and 4 gloo ranks at
the real chunk width: KL and both gradients torch.equal to the unsharded CPU op, uneven
shards (three chunks, one, 100 columns, none), -inf columns, huge logits, temperature,
bf16, a mask; the non-exact mode does not give those bits (the test can fail); the
public group= entry points pass exact= through."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import rlkernels
import vocab_parallel_checks as C
from property_support import bitwise_equal
from rlkernels.distributed import vocab_parallel as VP
from support import RankSuites
from test_vocab_parallel_exact import SHAPE, SIZES, _at_offset, _bounds, _problem, _same

K = VP.VOCAB_CHUNK
TRITON_ON_CPU = rlkernels.HAS_TRITON and rlkernels._library.triton_interpreting()
SLOT = 6  # kKlSlotWidth (csrc/core/kl_from_logits.h)


def _pair(g, vocab, dtype=torch.float32):
    """[2, 4, vocab] policy and reference logits: the log-prob problem's adversarial rows
    (-inf columns and a -inf chunk, huge logits, a late maximum, a large offset), a
    reference that rules out a token the policy can sample (KL inf), one -inf on both
    sides, a reference -inf chunk, and a reference close to the policy (KL ~ 0)."""
    x, _ = _problem(g, vocab)
    ref = 3 * torch.randn(*SHAPE, vocab, generator=g)
    ref[0, 0, 5] = -float("inf")                 # both -inf: adds nothing
    ref[0, 3, 17] = -float("inf")                # q = 0 < p: KL inf
    ref[1, 2, K: 2 * K] = -float("inf")          # a whole reference chunk -inf (p there is > 0 too)
    ref[1, 3] = x[1, 3] + 1e-3 * torch.randn(vocab, generator=g) + 7.0  # near the policy, offset
    ref[0, 2] *= 2000                            # huge reference logits
    return x.to(dtype), ref.to(dtype)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


# ---- kl_vocab_tile, single process --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kl_chunks_anywhere_fold_to_the_whole_rows_bits(dtype):
    """Tiles of one and two chunks, each from its own buffer at another offset, in
    reverse order, then the fold: the whole-row kernel's KL and saved statistics."""
    g = torch.Generator().manual_seed(5)
    vocab = 3 * K + 123
    x, ref = (_rows(t)[:, :vocab].contiguous() for t in _pair(g, 4 * K, dtype))
    want_kl, want_saved = torch.ops.rlkernels.kl_from_logits(x, ref, None, 0.8)
    state = torch.full((x.shape[0], 4, SLOT), float("nan"))
    tile = torch.ops.rlkernels.kl_vocab_tile
    for v0, v1, offset in ((3 * K, vocab, 5), (K, 3 * K, 3), (0, K, 1)):
        tile(_at_offset(x[:, v0:v1].contiguous(), offset), _at_offset(ref[:, v0:v1].contiguous(), offset + 2),
             state, 0.8, v0, False)
    tile(x[:, :0], ref[:, :0], state, 0.8, vocab, True)
    _same(state[:, 0, 0], want_kl, "KL")
    _same(state[:, 0, 1:], want_saved, "saved statistics")
    assert torch.isinf(want_kl).any() and (want_kl.abs() < 1e-2).any(), "the problem lost its adversarial rows"


def test_kl_one_tile_with_finish_and_strided_rows():
    g = torch.Generator().manual_seed(6)
    x, ref = (t[..., : 2 * K + 9] for t in _pair(g, 4 * K))
    want_kl, want_saved = torch.ops.rlkernels.kl_from_logits(x[:, 1:], ref[:, 1:], None, 1.0)
    state = torch.zeros(*SHAPE[:1], SHAPE[1] - 1, 3, SLOT)
    torch.ops.rlkernels.kl_vocab_tile(x[:, 1:], ref[:, 1:], state, 1.0, 0, True)  # strided rows
    _same(state[..., 0, 0], want_kl, "KL")
    _same(state[..., 0, 1:], want_saved, "saved statistics")


def test_kl_vocab_tile_opcheck_and_bad_input():
    g = torch.Generator().manual_seed(7)
    x, ref = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    ops = [torch.ops.rlkernels.kl_vocab_tile] + ([torch.ops.rlkernels.kl_vocab_tile_triton] if TRITON_ON_CPU else [])
    for op in ops:
        torch.library.opcheck(op.default, (x, ref, torch.zeros(3, 1, SLOT), 0.9, 0, True))
        torch.library.opcheck(op.default, (x[:, :0], ref[:, :0], torch.zeros(3, 1, SLOT), 0.9, 50, True))
        state = torch.zeros(3, 1, SLOT)
        bad = [
            (dict(state=torch.zeros(3, 1, 5)), "state"),
            (dict(state=torch.zeros(3, 1, SLOT, dtype=torch.float64)), "state"),
            (dict(state=torch.zeros(2, 1, SLOT)), "state"),
            (dict(state=torch.zeros(3, SLOT)), "state"),
            (dict(ref=torch.randn(3, 51)), "ref_logits"),
            (dict(ref=ref.double()), "ref_logits"),
            (dict(x=x.long(), ref=ref.long()), "logits"),
            (dict(temperature=0.0), "temperature"),
            (dict(vocab_start=-1), "vocab_start"),
            (dict(vocab_start=10), r"vocab_start must be a multiple of the vocabulary chunk"),
            (dict(vocab_start=K), "reaches past the state's 1 chunks"),
            (dict(state=torch.zeros(3, 2, SLOT)), r"with finish, the row ends at 50 columns, which is 1 chunks"),
        ]
        for change, words in bad:
            args = dict(x=x, ref=ref, state=state, temperature=1.0, vocab_start=0)
            args.update(change)
            with pytest.raises(RuntimeError, match=words):
                op(args["x"], args["ref"], args["state"], args["temperature"], args["vocab_start"], True)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the Triton twin runs on CPU under TRITON_INTERPRET=1")
def test_kl_vocab_tile_triton_twin_matches_the_cpu_op():
    """The twin's own arithmetic (not the CPU bits): close, with the same inf rows."""
    g = torch.Generator().manual_seed(8)
    x, ref = (_rows(t)[:, : 2 * K + 77].contiguous() for t in _pair(g, 4 * K))
    states = []
    for op in (torch.ops.rlkernels.kl_vocab_tile, torch.ops.rlkernels.kl_vocab_tile_triton):
        state = torch.zeros(x.shape[0], 3, SLOT)
        op(x[:, :K], ref[:, :K], state, 0.7, 0, False)
        op(x[:, K:], ref[:, K:], state, 0.7, K, True)
        states.append(state)
    cpu, twin = states
    assert torch.equal(torch.isinf(cpu[:, 0, 0]), torch.isinf(twin[:, 0, 0]))
    finite = torch.isfinite(cpu[:, 0, 0])
    C._close(twin[finite][:, 0], cpu[finite][:, 0], "Triton twin", 1e-4, 1e-4)


# ---- exact=True on gloo ranks -------------------------------------------------------------------

def check_kl(rank, world, *, dtype=torch.float32, temperature=0.7, masked=False):
    g = torch.Generator().manual_seed(31)
    full, full_ref = _pair(g, sum(SIZES[world]), dtype)
    mask = torch.rand(*SHAPE, generator=g) > 0.3 if masked else None
    grad = torch.randn(*SHAPE, generator=g)
    v0, v1 = _bounds(world, rank)
    a, b = full.clone().requires_grad_(True), full_ref.clone().requires_grad_(True)
    want = rlkernels.kl_from_logits(a, b, temperature=temperature, mask=mask, backend="cpu")
    (want.nan_to_num(posinf=0.0) * grad).sum().backward()
    sa = full[..., v0:v1].clone().requires_grad_(True)
    sb = full_ref[..., v0:v1].clone().requires_grad_(True)
    kl = VP.kl_from_logits(sa, sb, group=None, temperature=temperature, mask=mask, exact=True, timeout=60)
    (kl.nan_to_num(posinf=0.0) * grad).sum().backward()
    _same(kl, want.detach(), "KL")
    _same(sa.grad, a.grad[..., v0:v1], "gradient of the logits shard")
    _same(sb.grad, b.grad[..., v0:v1], "gradient of the reference logits shard")
    # the shards strided views of the full logits, through the public entry point
    again = rlkernels.kl_from_logits(full[..., v0:v1], full_ref[..., v0:v1], temperature=temperature, mask=mask,
                                     group=dist.group.WORLD, exact=True, backend="cpu")
    _same(again, want.detach(), "KL through rlkernels.kl_from_logits(group=, exact=True)")


def check_kl_bf16(rank, world):
    check_kl(rank, world, dtype=torch.bfloat16, temperature=1.0)


def check_kl_cold_masked(rank, world):
    check_kl(rank, world, temperature=0.05, masked=True)


def check_kl_differs_without_exact(rank, world):
    """The float64 rank-order merge (exact=False) does not give the unsharded bits here,
    so the checks above can fail."""
    g = torch.Generator().manual_seed(31)
    full, full_ref = _pair(g, sum(SIZES[world]))
    v0, v1 = _bounds(world, rank)
    want = rlkernels.kl_from_logits(full, full_ref, temperature=0.7, backend="cpu")
    merged = VP.kl_from_logits(full[..., v0:v1], full_ref[..., v0:v1], group=None, temperature=0.7, timeout=60)
    C._close(merged, want, "KL without exact mode", 1e-4, 1e-5)
    if bitwise_equal(merged, want):
        raise AssertionError("exact=False gave the unsharded bits: the exact checks could not fail here")


def check_kl_two_collectives_without_check(rank, world):
    """check=False: the header (the shard sizes the fold needs) and one all_gather of
    [N, widest shard's chunks, KL_CHUNK_STAT_WIDTH] float32."""
    g = torch.Generator().manual_seed(32)
    full, full_ref = _pair(g, sum(SIZES[world]))
    v0, v1 = _bounds(world, rank)
    with C.counted_all_gathers() as calls:
        kl = VP.kl_from_logits(full[..., v0:v1], full_ref[..., v0:v1], group=None, check=False, exact=True)
    n, widest = full.numel() // full.shape[-1], max(-(-size // K) for size in SIZES[world])
    expected = [(torch.int64, (8,)), (torch.float32, (n, widest, VP.KL_CHUNK_STAT_WIDTH))]
    if calls != expected:
        raise AssertionError(f"expected the collectives {expected}, got {calls}")
    _same(kl, rlkernels.kl_from_logits(full, full_ref, backend="cpu"), "KL with check=False")
    assert VP.traffic_bytes(n, world, kind="kl", shard_chunks=widest) == n * widest * 5 * 4 * (world - 1)


def check_kl_shards_off_the_chunk_edges_raise(rank, world):
    shard = torch.randn(3, 10)  # rank r starts at 10 r
    C._expect_mismatch(lambda: VP.kl_from_logits(shard, shard, group=None, exact=True, timeout=60),
                       rf"exact=True needs every shard to start on a multiple of the vocabulary chunk \({K}")


def check_kl_exact_needs_the_cpu_kernels(rank, world):
    try:
        VP.kl_from_logits(torch.randn(3, 10), torch.randn(3, 10), group=None, exact=True, backend="reference")
    except ValueError as exc:
        if "exact" not in str(exc):
            raise AssertionError(f"the error does not name exact: {exc}") from exc
        return
    raise AssertionError("exact=True with backend='reference' did not raise")


def check_public_entry_points_pass_exact(rank, world):
    """rlkernels.logprobs / linear_logprobs / linear_ppo_loss with group= and exact=True:
    the unsharded CPU op's log-probs."""
    g = torch.Generator().manual_seed(33)
    vocab, H = sum(SIZES[world]), 8
    full, labels = _problem(g, vocab)
    hidden, weight = torch.randn(*SHAPE, H, generator=g), 0.5 * torch.randn(vocab, H, generator=g)
    v0, v1 = _bounds(world, rank)
    world_group = dist.group.WORLD
    _same(rlkernels.logprobs(full[..., v0:v1], labels, group=world_group, exact=True, backend="cpu"),
          rlkernels.logprobs(full, labels, backend="cpu"), "rlkernels.logprobs(group=, exact=True)")
    rollout = rlkernels.linear_logprobs(hidden, weight, labels, backend="cpu")
    _same(rlkernels.linear_logprobs(hidden, weight[v0:v1], labels, group=world_group, exact=True, backend="cpu"),
          rollout, "rlkernels.linear_logprobs(group=, exact=True)")
    _, stats = rlkernels.linear_ppo_loss(hidden, weight[v0:v1], labels, rollout, torch.randn(*SHAPE, generator=g),
                                         group=world_group, exact=True, backend="cpu")
    if float(stats["ratio_max"]) != 1.0:
        raise AssertionError(f"linear_ppo_loss(group=, exact=True): an unchanged policy must have ratio 1: {stats}")


CHECKS = {name[len("check_"):]: fn for name, fn in list(globals().items()) if name.startswith("check_")}
SUITES = RankSuites(functools.partial(C.run_suite, checks=CHECKS), CHECKS, timeout_s=300, pg_timeout_s=60)


@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("world", [2, 4])
def test_kl_exact_multi_rank(world, name):
    SUITES.check(world, name)
