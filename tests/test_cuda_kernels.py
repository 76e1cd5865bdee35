"""The CUDA kernels' work splits (docs/cuda-kernels.md) at the sizes that cross them, on
a GPU (skipped without one): fixed vocabulary chunks and their batch invariance, GAE's
[32 rows x 32 steps] warp tiles, masked_whiten's parts, group_advantages' sorted runs,
multi_tensor's launches of 128 tensors and its table cache under a CUDA graph.  The
op tests cover small sizes on every backend; these run the GPU backends (CUDA, and
Triton beside it) against the reference."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import assert_close, backends_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
GPU_BACKENDS = backends_for("cuda") if torch.cuda.is_available() else []


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("V", [8191, 8192, 8193, 50257, 50264, 3 * 8192 + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl", [False, True])
def test_vocabulary_chunks_batch_invariant(backend, V, dtype, kl):
    """A row alone, in a small batch and in a batch of more rows than 4 per SM (where the
    old split-V changed its mind) gives the same bits; odd V puts rows at every alignment."""
    g = _gen(V)
    N = 600
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype).cuda()
    ref = (logits.float() * 0.5 + 0.1).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g).cuda()

    def run(rows):
        if kl:
            return [rlkernels.kl_from_logits(logits[rows], ref[rows], backend=backend)]
        return list(rlkernels.logprobs(logits[rows], labels[rows], entropy=True, backend=backend))

    full = run(slice(0, N))
    for row in (0, 1, 7, N - 1):
        for rows in (slice(row, row + 1), slice(max(row - 2, 0), row + 3)):
            part = run(rows)
            at = row - rows.start
            for a, b in zip(full, part):
                assert torch.equal(a[row], b[at]), (row, rows)
    if kl:
        want = reference.kl_from_logits(logits.double(), ref.double())
        assert_close(full[0], want, dtype=torch.float32)
    else:
        lp, ent = reference.logprobs(logits.double(), labels, entropy=True)
        assert_close(full[0], lp, dtype=torch.float32)
        assert_close(full[1], ent, dtype=torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 1), (31, 33), (33, 65), (129, 32), (300, 1000), (5, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gae_tiles(backend, B, T, dtype):
    """Partial warps (B not a multiple of 32) and partial chunks (T not a multiple of 32),
    with interior mask gaps, episode ends and bootstrap values."""
    g = _gen(B * T)
    rewards = torch.randn(B, T, generator=g).to(dtype)
    values = torch.randn(B, T, generator=g).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.2
    dones = torch.rand(B, T, generator=g) > 0.97
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    last = torch.randn(B, generator=g).to(acc)
    kw = dict(gamma=0.99, lam=0.95)
    adv, ret = rlkernels.gae(rewards.cuda(), values.cuda(), mask.cuda(), dones=dones.cuda(), last_values=last.cuda(),
                             backend=backend, **kw)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, dones=dones, last_values=last.double(),
                                       **kw)
    assert_close(adv, want_adv, dtype=acc)
    assert_close(ret, want_ret, dtype=acc)
    returns = rlkernels.discounted_returns(rewards.cuda(), mask.cuda(), dones=dones.cuda(), gamma=0.99,
                                           backend=backend)
    assert_close(returns, reference.discounted_returns(rewards.double(), mask, dones=dones, gamma=0.99), dtype=acc)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [1, 8191, 8193, 1_000_003, 8192 * 1024 + 1])
def test_masked_whiten_parts(backend, n):
    """One part, several, and past 1024 x 8192 values (parts of 16384): against the
    float64 reference, and the same bits on a second call."""
    g = _gen(n)
    x = (torch.randn(n, generator=g) * 3 + 1).cuda()
    mask = (torch.rand(n, generator=g) > 0.3).cuda()
    out = rlkernels.masked_whiten(x, mask, backend=backend)
    assert_close(out, reference.masked_whiten(x.double(), mask), dtype=torch.float32)
    assert torch.equal(out, rlkernels.masked_whiten(x, mask, backend=backend))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_group_advantages_sorted_runs(backend, scale, baseline):
    """Ids in random order, groups of one to many members, empty groups."""
    g = _gen(1)
    N, G = 5000, 700
    index = torch.randint(0, G - 50, (N,), generator=g)  # the last 50 groups are empty
    scores = torch.randn(N, generator=g)
    scores[index == 3] = 2.5  # an all-equal group
    adv, equal = rlkernels.group_advantages(scores.cuda(), group_index=index.cuda(), num_groups=G, scale=scale,
                                            baseline=baseline, backend=backend)
    want_adv, want_equal = reference.group_advantages(scores.double(), group_index=index, num_groups=G, scale=scale,
                                                      baseline=baseline)
    assert_close(adv, want_adv, dtype=torch.float32)
    assert torch.equal(equal.cpu(), want_equal)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_multi_tensor_many_launches_and_graph(backend):
    """300 tensors (three CUDA launches of up to 128), odd and empty sizes; then an
    averaging round captured in a CUDA graph after an eager warm-up and replayed."""
    g = _gen(2)
    sizes = torch.randint(0, 5000, (300,), generator=g).tolist()
    sizes[::11] = [0] * len(sizes[::11])
    tensors = [torch.randn(s, generator=g).cuda() for s in sizes]
    bucket = rlkernels.pack_tensors(tensors, dtype=torch.bfloat16, scale=0.5, backend=backend)
    want = torch.empty_like(bucket)
    reference.pack_tensors(tensors, want, 0.5)
    assert torch.equal(bucket, want)

    bucket = torch.empty(sum(sizes), device="cuda")
    rlkernels.pack_tensors(tensors, out=bucket, backend=backend)  # warm-up: builds the tables
    rlkernels.unpack_tensors(bucket, tensors, scale=2.0, backend=backend)
    torch.cuda.synchronize()
    before = [t.clone() for t in tensors]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rlkernels.pack_tensors(tensors, out=bucket, backend=backend)
        rlkernels.unpack_tensors(bucket, tensors, scale=2.0, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b * 2)
