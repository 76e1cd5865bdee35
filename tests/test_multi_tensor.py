"""pack_tensors, unpack_tensors and gossip_mix (the kernels behind
rlkernels.distributed): every backend against the reference, exact scaling, special
values, opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU, assert_close, low_precision_bound

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = {
    "one": [(1,)],
    "mixed": [(3, 7), (0,), (5,), (1, 1, 1), (2, 0, 3), (129,)],
    "many_small": [(int(s),) for s in torch.randint(0, 40, (120,), generator=torch.Generator().manual_seed(1))],
    "large": [(70001,), (3, 4099)],
}


def make_tensors(shapes, dtype, device="cpu", scale=3.0):
    return [(torch.randn(s, device=device) * scale).to(dtype) for s in shapes]


def flat_reference(tensors, dtype, scale):
    bucket = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
    reference.pack_tensors(tensors, bucket, scale)
    return bucket


def _sizes_for(backend):
    # Triton runs under the CPU interpreter here: keep its problems small.
    return [k for k in SIZES if not (backend == "triton" and k == "large")]


@pytest.mark.parametrize("src", FLOATS, ids=str)
@pytest.mark.parametrize("dst", FLOATS, ids=str)
@pytest.mark.parametrize("scale", [1.0, 1 / 3, -2.5])
def test_pack_matches_reference_bitwise(backend_device, src, dst, scale):
    backend, device = backend_device
    for kind in _sizes_for(backend):
        tensors = make_tensors(SIZES[kind], src, device)
        bucket = rlkernels.pack_tensors(tensors, dtype=dst, scale=scale, backend=backend)
        assert bucket.dtype == dst and bucket.shape == (sum(t.numel() for t in tensors),)
        assert torch.equal(bucket, flat_reference(tensors, dst, scale)), kind


@pytest.mark.parametrize("bucket_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("tensor_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.25, 1 / 7])
def test_unpack_matches_reference_bitwise(backend_device, bucket_dtype, tensor_dtype, scale):
    backend, device = backend_device
    for kind in _sizes_for(backend):
        shapes = SIZES[kind]
        total = sum(torch.Size(s).numel() for s in shapes)
        bucket = (torch.randn(total, device=device) * 5).to(bucket_dtype)
        ours = [torch.full(s, float("nan"), device=device).to(tensor_dtype) for s in shapes]
        expected = [torch.empty(s, device=device).to(tensor_dtype) for s in shapes]
        rlkernels.unpack_tensors(bucket, ours, scale=scale, backend=backend)
        reference.unpack_tensors(bucket, expected, scale)
        for a, b in zip(ours, expected):
            assert torch.equal(a, b), kind


def test_round_trip_keeps_every_bit(backend_device):
    """Same dtype, scale 1: a bit copy, so NaN payloads, infinities, -0.0 and
    subnormals survive."""
    backend, device = backend_device
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, -3e-39, 3.4e38, 1.0],
                           device=device)
    for dtype in FLOATS:
        tensors = [special.to(dtype), make_tensors([(17,)], dtype, device)[0], special.to(dtype)[:0]]
        bucket = rlkernels.pack_tensors(tensors, backend=backend)
        restored = [torch.empty_like(t) for t in tensors]
        rlkernels.unpack_tensors(bucket, restored, backend=backend)
        for a, b in zip(tensors, restored):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("world", [2, 3, 5, 7])
def test_scaled_unpack_is_exact_division(backend_device, dtype, world):
    """Unpacking a sum with scale 1/n equals sum / n bit for bit: what makes
    average_parameters equal dist.all_reduce followed by a division."""
    backend, device = backend_device
    sums = (torch.randn(3001, device=device) * 100).to(dtype)
    out = [torch.empty(3001, device=device, dtype=dtype)]
    rlkernels.unpack_tensors(sums, out, scale=1.0 / world, backend=backend)
    assert torch.equal(out[0], sums / world)


def test_compressed_pack_does_not_overflow(backend_device):
    """fp16 tops out at 65504: values near it, scaled by 1/4 before the cast, sum
    over 4 ranks without overflow."""
    backend, device = backend_device
    values = torch.full((1000,), 60000.0, device=device)
    bucket = rlkernels.pack_tensors([values], dtype=torch.float16, scale=0.25, backend=backend)
    assert torch.isfinite(bucket * 4).all() and torch.isfinite(bucket.float().sum())
    assert bucket.float().mul(4).eq(60000.0).all()
    naive = values.to(torch.float16) * 4
    assert torch.isinf(naive).all()


def test_pack_into_out_and_noncontiguous(backend_device):
    backend, device = backend_device
    base = torch.randn(6, 10, device=device)
    tensors = [base[:, ::2], base.t()[1:4], torch.randn(5, device=device)]
    out = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float64, device=device)
    got = rlkernels.pack_tensors(tensors, out=out, backend=backend)
    assert got is out
    assert torch.equal(out, torch.cat([t.reshape(-1) for t in tensors]).double())
    # unpack into non-contiguous targets writes through to them
    targets = [torch.zeros(10, 6, device=device).t()[:, ::2], torch.zeros(4, 5, device=device).t()]
    bucket = torch.arange(30 + 20, dtype=torch.float32, device=device)
    rlkernels.unpack_tensors(bucket, targets, scale=2.0, backend=backend)
    assert torch.equal(targets[0].reshape(-1), bucket[:30] * 2)
    assert torch.equal(targets[1].reshape(-1), bucket[30:] * 2)


def test_empty_list_and_empty_tensors(backend_device):
    backend, device = backend_device
    assert rlkernels.pack_tensors([], backend=backend).numel() == 0
    tensors = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    assert rlkernels.pack_tensors(tensors, backend=backend).numel() == 0
    rlkernels.unpack_tensors(torch.empty(0, device=device), tensors, backend=backend)


def test_pack_parameters_with_grad(backend_device):
    backend, device = backend_device
    model = torch.nn.Linear(5, 3).to(device)
    params = list(model.parameters())
    bucket = rlkernels.pack_tensors(params, backend=backend)
    assert not bucket.requires_grad
    rlkernels.unpack_tensors(bucket * 0 + 1, [p.detach() for p in params], backend=backend)
    assert all(bool((p == 1).all()) for p in params)


# ---- gossip_mix --------------------------------------------------------------------------------

WEIGHTS = [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.25, 0.25), (0.2, 0.7, 0.1), (1.0, 0.0, 0.0)]


@pytest.mark.interpreter_heavy(lambda p: p["n"] > 1000 and p["dtype"] != torch.float32)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "-".join(f"{x:.2f}" for x in w))
@pytest.mark.parametrize("n", [1, 7, 4099])
def test_gossip_mix_matches_reference(backend_device, dtype, weights, n):
    backend, device = backend_device
    x, left, right = (torch.randn(n, device=device) * 10).to(dtype), (torch.randn(n, device=device) * 10).to(dtype), \
        (torch.randn(n, device=device) * 10).to(dtype)
    ours = rlkernels.gossip_mix(x, left, right, weights, backend=backend)
    assert ours.dtype == dtype and ours.shape == x.shape
    truth = reference.gossip_mix(x.double(), left.double(), right.double(), *weights)
    if dtype == torch.float64:
        assert_close(ours, truth)
    elif dtype == torch.float32:
        assert_close(ours, truth)
        assert_close(ours, reference.gossip_mix(x, left, right, *weights))
    else:
        naive = weights[0] * x + weights[1] * left + weights[2] * right  # PyTorch in the same dtype
        low_precision_bound(ours, naive, truth, floor=1e-6)


def test_gossip_mix_in_place_and_noncontiguous(backend_device):
    backend, device = backend_device
    x, left, right = torch.randn(3, 8, 5, device=device).unbind(0)
    expected = reference.gossip_mix(x, left, right, 0.5, 0.3, 0.2)
    mine = x.clone()
    got = rlkernels.gossip_mix(mine, left, right, (0.5, 0.3, 0.2), out=mine, backend=backend)
    assert got is mine
    assert_close(mine, expected)
    xt = x.t()
    out = torch.empty(8, 5, device=device).t()
    rlkernels.gossip_mix(xt, left.t(), right.t(), (0.5, 0.3, 0.2), out=out, backend=backend)
    assert_close(out, expected.t())


def test_gossip_mix_keeps_mean_of_ring(backend_device):
    """Mixing every rank of a ring with its neighbours keeps the mean over ranks."""
    backend, device = backend_device
    thetas = torch.randn(4, 257, dtype=torch.float64, device=device)
    mixed = torch.stack([rlkernels.gossip_mix(thetas[i], thetas[i - 1], thetas[(i + 1) % 4], backend=backend)
                         for i in range(4)])
    assert_close(mixed.mean(0), thetas.mean(0))


# ---- torch.library integration ----------------------------------------------------------------

def _op_samples():
    tensors = make_tensors([(3, 4), (5,), (0,)], torch.float32)
    yield "pack", (tensors, torch.empty(17, dtype=torch.bfloat16), 0.5)
    yield "pack_f64", ([t.double() for t in tensors], torch.empty(17, dtype=torch.float64), 1.0)
    yield "unpack", (torch.randn(17), [torch.empty(3, 4), torch.empty(5), torch.empty(0)], 0.25)
    x = torch.randn(4, 6)
    yield "mix", (x, torch.randn(4, 6), torch.randn(4, 6), 0.5, 0.25, 0.25, torch.empty(4, 6))
    yield "mix_bf16", (x.bfloat16(), x.bfloat16(), x.bfloat16(), 0.2, 0.3, 0.5, torch.empty(4, 6, dtype=torch.bfloat16))


_OPS = {"pack": "pack_tensors", "pack_f64": "pack_tensors", "unpack": "unpack_tensors", "mix": "gossip_mix",
        "mix_bf16": "gossip_mix"}


@pytest.mark.parametrize("name,args", list(_op_samples()), ids=[n for n, _ in _op_samples()])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.rlkernels, _OPS[name]).default, args)


@pytest.mark.parametrize("name,args", list(_op_samples())[::2], ids=[n for n, _ in list(_op_samples())[::2]])
def test_triton_opcheck(name, args):
    if not TRITON_ON_CPU:
        pytest.skip("Triton cannot run on CPU tensors here (TRITON_INTERPRET=1 needed)")
    torch.library.opcheck(getattr(torch.ops.rlkernels, _OPS[name] + "_triton").default, args)


def test_torch_compile_fullgraph():
    tensors = make_tensors([(3, 4), (7,)], torch.float32)
    targets = [torch.zeros(3, 4), torch.zeros(7)]

    @torch.compile(fullgraph=True, backend="eager")
    def step(a, b, x, left, right):
        bucket = rlkernels.pack_tensors([a, b], dtype=torch.bfloat16, scale=0.5)
        rlkernels.unpack_tensors(bucket, targets, scale=2.0)
        return bucket, rlkernels.gossip_mix(x, left, right, (0.5, 0.25, 0.25))

    x, left, right = torch.randn(3, 9).unbind(0)
    bucket, mixed = step(*tensors, x, left, right)
    assert torch.equal(bucket, flat_reference(tensors, torch.bfloat16, 0.5))
    expected = [torch.zeros(3, 4), torch.zeros(7)]
    reference.unpack_tensors(bucket, expected, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(targets, expected))
    assert_close(mixed, reference.gossip_mix(x, left, right, 0.5, 0.25, 0.25))


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (lambda: rlkernels.pack_tensors(torch.randn(3)), TypeError, "tensors must be a list or tuple"),
    (lambda: rlkernels.pack_tensors([torch.randn(3), torch.randn(2).double()]), TypeError,
     r"tensors must share one dtype: tensors\[0\] is torch.float32, tensors\[1\] is torch.float64"),
    (lambda: rlkernels.pack_tensors([torch.ones(3, dtype=torch.int64)]), TypeError, r"tensors\[0\] must have dtype"),
    (lambda: rlkernels.pack_tensors([torch.randn(3), "x"]), TypeError, r"tensors\[1\] must be a torch.Tensor"),
    (lambda: rlkernels.pack_tensors([torch.randn(3), torch.randn(2, device="meta")]), ValueError,
     r"tensors\[1\] is on meta but tensors\[0\] is on cpu"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], out=torch.empty(4)), ValueError,
     "bucket must have 3 elements"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], out=torch.empty(3, 1)), ValueError, "bucket must be 1-D"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], out=torch.empty(6)[::2]), ValueError,
     "bucket must be contiguous"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], out=torch.empty(3), dtype=torch.float16), TypeError,
     "disagrees with out's dtype"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], dtype=torch.int32), TypeError, "dtype must be one of"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], scale=float("nan")), ValueError, "scale must not be NaN"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], scale=float("inf")), ValueError, "scale must be finite"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], scale="2"), TypeError, "scale must be a number"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], backend="gpu"), ValueError, "backend must be one of"),
    (lambda: rlkernels.pack_tensors([torch.randn(3)], backend="cuda"), ValueError, "backend='cuda' is unavailable"),
    (lambda: rlkernels.unpack_tensors(torch.randn(5), [torch.empty(3)]), ValueError, "bucket must have 3 elements"),
    (lambda: rlkernels.unpack_tensors(torch.randn(3).long(), [torch.empty(3)]), TypeError,
     "bucket must have dtype"),
    (lambda: rlkernels.gossip_mix(torch.randn(3), torch.randn(4), torch.randn(3)), ValueError,
     "left must have the shape of x"),
    (lambda: rlkernels.gossip_mix(torch.randn(3), torch.randn(3), torch.randn(3).double()), TypeError,
     "right must have the dtype of x"),
    (lambda: rlkernels.gossip_mix(torch.randn(3), torch.randn(3), torch.randn(3), out=torch.empty(3).half()),
     TypeError, "out must have the dtype of x"),
    (lambda: rlkernels.gossip_mix(torch.randn(3), torch.randn(3), torch.randn(3, device="meta")), ValueError,
     "right is on meta but x is on cpu"),
    (lambda: rlkernels.gossip_mix(torch.randn(3), torch.randn(3), torch.randn(3), (0.5, 0.5, 0.5)), ValueError,
     "weights must sum to 1"),
    (lambda: rlkernels.gossip_mix(torch.randn(3), torch.randn(3), torch.randn(3), (1.5, -0.25, -0.25)), ValueError,
     "weights.w_left must be >= 0.0"),
    (lambda: rlkernels.gossip_mix(torch.randn(3), torch.randn(3), torch.randn(3), (0.5, 0.5)), TypeError,
     "weights must be a tuple"),
    (lambda: rlkernels.gossip_mix(torch.ones(3, dtype=torch.int32), torch.ones(3), torch.ones(3)), TypeError,
     "x must have dtype"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_direct_op_calls_check_sizes():
    """torch.ops calls skip the Python validation; the kernels still refuse sizes
    that would read or write out of bounds."""
    with pytest.raises(RuntimeError, match="bucket has 4 elements but the tensors hold 3"):
        torch.ops.rlkernels.pack_tensors([torch.randn(3)], torch.empty(4), 1.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype"):
        torch.ops.rlkernels.unpack_tensors(torch.randn(5), [torch.empty(3), torch.empty(2).double()], 1.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.rlkernels.pack_tensors([torch.randn(4, 2).t()], torch.empty(8), 1.0)
    with pytest.raises(RuntimeError, match="left must have the shape of x"):
        torch.ops.rlkernels.gossip_mix(torch.randn(3), torch.randn(2), torch.randn(3), 1.0, 0.0, 0.0, torch.empty(3))


def test_unpack_finds_targets_sharing_memory_anywhere_in_a_long_list():
    # targets are checked against each other by sorted byte ranges, not pair by pair:
    # overlaps between the first and the last, or between neighbours in memory order, are found
    base = torch.zeros(4000)
    parts = [base[i * 40:(i + 1) * 40] for i in range(100)]
    bucket = torch.ones(4000 + 10)
    clash = base[3990:4000]  # inside parts[99]
    with pytest.raises(ValueError, match=r"tensors\[(0|100)\].*tensors\[(99|100)\]|tensors\[100\] .*tensors\[99\]"):
        rlkernels.unpack_tensors(bucket, parts + [clash])
    first_last = [base[0:10]] + [torch.zeros(10) for _ in range(50)] + [base[5:15]]
    with pytest.raises(ValueError, match=r"tensors\[51\] partially overlaps tensors\[0\]"):
        rlkernels.unpack_tensors(torch.ones(520), first_last)
    rlkernels.unpack_tensors(torch.arange(4000.0), parts)  # disjoint neighbours are fine
    assert torch.equal(base, torch.arange(4000.0))


def _python_checks_pass(op, bucket, tensors) -> bool:
    """Whether the front end's Python checks (the slow path) accept the call."""
    from rlkernels.ops import multi_tensor as M

    try:
        M._tensor_list(op, tensors)
        targets = [t.contiguous() for t in tensors]
        for i, t in M._sharing_bucket(bucket, targets):
            rlkernels._overlap.check_output(op, "t", t, "bucket", bucket, allow_full=False)
        if op == "unpack_tensors":
            shared = rlkernels._overlap.first_shared(targets)
            if shared is not None:
                j, i = shared
                rlkernels._overlap.check_output(op, "a", targets[i], "b", targets[j], allow_full=False)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("seed", range(40))
def test_compiled_all_clear_never_passes_what_python_refuses(seed):
    """_C.multi_tensor_clear lets pack/unpack skip the Python checks: it may say "not
    shown" too often, never "clear" where those checks raise.  Layouts drawn at random:
    views into one storage that may be the bucket's (own slices, shifted slices, other
    dtypes, overlapping or strided views), separate tensors, mixed dtypes."""
    from rlkernels._library import _C

    g = torch.Generator().manual_seed(seed)

    def draw(n):
        return int(torch.randint(0, n, (1,), generator=g))

    storage = torch.zeros(256)
    bucket_start = draw(8)
    sizes = [1 + draw(12) for _ in range(1 + draw(5))]
    bucket = storage[bucket_start: bucket_start + sum(sizes)]
    tensors, offset = [], 0
    for size in sizes:
        kind = draw(7)
        if kind == 0:  # its own slice of the bucket
            t = bucket[offset: offset + size]
        elif kind == 1:  # a shifted slice (partial overlap)
            start = bucket_start + offset + 1 + draw(3)
            t = storage[start: start + size]
        elif kind == 2:  # another dtype over the same bytes
            t = storage[bucket_start + offset: bucket_start + offset + size].view(torch.int32).view(torch.float32)
            t = t if draw(2) else storage.view(torch.int32)[bucket_start + offset: bucket_start + offset + size]
        elif kind == 3:  # strided view elsewhere in the storage
            start = 128 + draw(64)
            t = storage[start: start + 2 * size: 2]
        elif kind == 4:  # a view elsewhere that may overlap another drawn view
            start = 128 + draw(16)
            t = storage[start: start + size]
        elif kind == 5:
            t = torch.randn(size, dtype=torch.float64 if draw(4) == 0 else torch.float32)
        else:
            t = torch.randn(size)
        tensors.append(t)
        offset += size
    for op, distinct in (("pack_tensors", False), ("unpack_tensors", True)):
        clear = _C.multi_tensor_clear(bucket, tensors, distinct)
        if clear:
            assert _python_checks_pass(op, bucket, tensors), (op, seed)


def test_compiled_all_clear_takes_the_usual_call():
    """The fast path is taken by plain calls (separate tensors, or the bucket's own slices)."""
    from rlkernels._library import _C

    tensors = [torch.randn(5), torch.randn(3, 2)]
    bucket = torch.empty(11)
    assert _C.multi_tensor_clear(bucket, tensors, True)
    assert _C.multi_tensor_clear(bucket, [bucket[:5], bucket[5:].view(3, 2)], False)
    assert not _C.multi_tensor_clear(bucket, [bucket[1:6], tensors[1]], False)
    assert not _C.multi_tensor_clear(bucket, [tensors[0], tensors[0][1:]], True)
    assert not _C.multi_tensor_clear(bucket, [tensors[0], tensors[1].t()], True)
    assert not _C.multi_tensor_clear(bucket, [tensors[0], tensors[1].double()], True)
    assert not _C.multi_tensor_clear(bucket, [tensors[0], torch.arange(6)], True)
