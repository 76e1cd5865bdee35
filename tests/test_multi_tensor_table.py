"""The per-tensor work table of pack_tensors / unpack_tensors (issue 13): tensors of odd
and empty sizes in many-tensor lists on every backend, and, for Triton, the table's cache:
built and copied to the device once per parameter set, never on a repeated call, and
rebuilt (never stale) when the set changes in any of addresses, sizes or dtypes."""
from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels import reference
from support import TRITON_ON_CPU

triton_only = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Around the Triton block (2048) and the CUDA tile (1024): one short, exact, one over.
EDGES = [0, 1, 2, 1023, 1024, 1025, 2047, 2048, 2049, 4097]


def _shapes(count: int, seed: int) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3000, (count,), generator=g).tolist()
    sizes[::7] = [0] * len(sizes[::7])  # empty tensors, the first one among them
    shapes = [(s,) if i % 3 else (1, s) for i, s in enumerate(sizes)]
    return shapes + [(e,) for e in EDGES] + [(0,)]  # and an empty one last


def _tensors(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 3).to(dtype).to(device) for s in shapes]


def _reference_bucket(tensors, dtype, scale):
    bucket = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
    reference.pack_tensors(tensors, bucket, scale)
    return bucket


@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float16), (torch.float64, torch.bfloat16)], ids=str)
def test_many_odd_tensors_round_trip(backend_device, src, dst):
    """~200 tensors (empty ones first, last and between) through pack and unpack, against
    the reference bit for bit."""
    backend, device = backend_device
    tensors = _tensors(_shapes(200, seed=1), src, device)
    for scale in (1.0, 0.375):
        bucket = rlkernels.pack_tensors(tensors, dtype=dst, scale=scale, backend=backend)
        assert torch.equal(bucket, _reference_bucket(tensors, dst, scale))
        ours = [torch.full_like(t, float("nan")) for t in tensors]
        want = [torch.empty_like(t) for t in tensors]
        rlkernels.unpack_tensors(bucket, ours, scale=1 / scale, backend=backend)
        reference.unpack_tensors(bucket, want, 1 / scale)
        for i, (a, b) in enumerate(zip(ours, want)):
            assert torch.equal(a, b), i


def test_only_empty_tensors(backend_device):
    backend, device = backend_device
    tensors = [torch.empty(0, device=device) for _ in range(5)]
    assert rlkernels.pack_tensors(tensors, backend=backend).numel() == 0
    rlkernels.unpack_tensors(torch.empty(0, device=device), tensors, backend=backend)


@pytest.fixture
def table_counts(monkeypatch):
    """Counts the Triton host code's table builds and uploads, starting from an empty cache."""
    from rlkernels.triton import multi_tensor as mt

    counts = {"built": 0, "uploaded": 0}
    host_table, upload = mt._host_table, mt._upload

    def counted_host_table(tensors):
        counts["built"] += 1
        return host_table(tensors)

    def counted_upload(table, device):
        counts["uploaded"] += 1
        return upload(table, device)

    monkeypatch.setattr(mt, "_host_table", counted_host_table)
    monkeypatch.setattr(mt, "_upload", counted_upload)
    monkeypatch.setattr(mt, "_tables", type(mt._tables)())
    return counts


def _round(tensors, bucket_dtype):
    bucket = rlkernels.pack_tensors(tensors, dtype=bucket_dtype, scale=0.5, backend="triton")
    rlkernels.unpack_tensors(bucket, tensors, scale=2.0, backend="triton")
    return bucket


@triton_only
def test_repeated_round_builds_and_uploads_once(table_counts):
    """An averaging round (pack, then unpack into the same tensors) repeated: one table
    for both directions and every repeat, so no host work on the table and no copy."""
    tensors = _tensors(_shapes(30, seed=2), torch.float32, "cpu")
    before = [t.clone() for t in tensors]
    for _ in range(3):
        bucket = _round(tensors, torch.float32)
    assert table_counts == {"built": 1, "uploaded": 1}
    assert torch.equal(bucket, _reference_bucket(before, torch.float32, 0.5))
    for t, b in zip(tensors, before):  # x * 0.5 * 2.0 is exact
        assert torch.equal(t, b)


@triton_only
@pytest.mark.parametrize("change", ["new tensor", "resized", "reordered", "dropped", "dtype view"])
def test_changed_parameter_set_gets_a_new_table(table_counts, change):
    """After a cached set, a set that differs in one address, size, order, count or dtype
    must not reuse the table: the results are those of the new set."""
    tensors = _tensors([(5, 7), (0,), (3001,), (2048,), (9,)], torch.float32, "cpu")
    _round(tensors, torch.float32)
    assert table_counts["uploaded"] == 1
    changed = list(tensors)
    if change == "new tensor":
        changed[2] = torch.randn(3001)
    elif change == "resized":
        changed[3] = tensors[3][:2047]  # same address, one element fewer
    elif change == "reordered":
        changed[0], changed[4] = changed[4], changed[0]
    elif change == "dropped":
        changed = changed[1:]
    else:  # the same bytes read as bfloat16 pairs: same address, twice the elements
        changed = [t.view(torch.bfloat16) if t.numel() else t.to(torch.bfloat16) for t in changed]
    bucket = rlkernels.pack_tensors(changed, backend="triton")
    assert table_counts["uploaded"] == 2
    # a plain copy: float32 bits read as bfloat16 (NaNs and subnormals among them) stay as they are
    assert torch.equal(bucket.view(torch.uint8), torch.cat([t.reshape(-1) for t in changed]).view(torch.uint8))
    # and the first set's table is still right for the first set
    assert torch.equal(rlkernels.pack_tensors(tensors, scale=0.5, backend="triton"),
                       _reference_bucket(tensors, torch.float32, 0.5))


@triton_only
def test_reused_memory_with_the_same_layout_is_correct(table_counts):
    """A key holds only addresses and sizes, which is all the table holds: tensors freed and
    replaced by new ones at the same addresses (the allocator's habit) are copied right."""
    first = _tensors([(100,), (7,)], torch.float32, "cpu")
    storage = torch.empty(107)
    views = [storage[:100], storage[100:]]
    for v, t in zip(views, first):
        v.copy_(t)
    _round(views, torch.float32)
    storage.copy_(torch.randn(107))  # new values at the same addresses
    bucket = rlkernels.pack_tensors(views, scale=0.5, backend="triton")
    assert torch.equal(bucket, storage * 0.5)
    assert table_counts["uploaded"] == 1


@triton_only
def test_cache_is_bounded(table_counts):
    from rlkernels.triton import multi_tensor as mt

    sets = [_tensors([(i + 1,), (3,)], torch.float32, "cpu") for i in range(mt._TABLES_KEPT + 5)]
    for tensors in sets:
        assert torch.equal(rlkernels.pack_tensors(tensors, backend="triton"), torch.cat(tensors))
    assert len(mt._tables) == mt._TABLES_KEPT
    assert table_counts["uploaded"] == len(sets)


@triton_only
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_table_of_mixed_bucket_dtypes(table_counts, dtype):
    """One parameter set packed into buckets of every dtype: one table, every result exact."""
    tensors = _tensors(_shapes(12, seed=3), dtype, "cpu")
    for bucket_dtype in FLOATS:
        bucket = rlkernels.pack_tensors(tensors, dtype=bucket_dtype, scale=0.25, backend="triton")
        assert torch.equal(bucket, _reference_bucket(tensors, bucket_dtype, 0.25)), bucket_dtype
    assert table_counts["uploaded"] == 1
