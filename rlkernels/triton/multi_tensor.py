"""Pack/unpack between many tensors and one flat bucket, and the gossip mixing step,
in Triton.  One launch covers every tensor: each program copies one block of
_BLOCK elements of one tensor, and finds which by a binary search over the
tensors' first program numbers in a per-tensor table (so a single large tensor and
a thousand small ones both keep every program busy).  The table holds O(number of
tensors) values, is built once per parameter set and stays on the device
(`_table`): a repeated call with the same tensors copies nothing to the device and
never waits for it, so an averaging round can be captured in a CUDA graph once a
first call has built its table."""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype
from ..ops._registry import triton_twin
from . import _checks as C
from ._common import cast_to, coef_tensor, on_inputs_device
from ..reference.multi_tensor import scale_dtype

_BLOCK = 2048
# Parameter sets whose tables are kept (an averager alternates pack and unpack over
# the same few buckets of tensors).
_TABLES_KEPT = 16

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
       torch.bfloat16: tl.bfloat16}

# Rows of the int64 table, each count + 1 long: every tensor's first program (and
# the total number of programs last), its address, its start in the bucket, its numel
# (tl.constexpr: jitted code reads them).
_FIRST, _ADDRESS, _OFFSET, _NUMEL = (tl.constexpr(row) for row in range(4))


@triton.jit
def _multi_tensor_copy_kernel(table_ptr, count, bucket_ptr, scale_ptr, PACK: tl.constexpr, PLAIN: tl.constexpr,
                              TENSOR_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                              STEPS: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    width = count + 1
    # The tensor t with first[t] <= program < first[t + 1]: an empty tensor owns no
    # program (its first equals the next one's), and first[count] is the total.
    lo = program * 0
    hi = lo + count
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        below = tl.load(table_ptr + _FIRST * width + mid) <= program
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    t = lo
    block = program - tl.load(table_ptr + _FIRST * width + t)
    tensor_ptr = tl.load(table_ptr + _ADDRESS * width + t).to(tl.pointer_type(TENSOR_DTYPE))
    offset = tl.load(table_ptr + _OFFSET * width + t)
    numel = tl.load(table_ptr + _NUMEL * width + t)
    idx = block * BLOCK + tl.arange(0, BLOCK)
    live = idx < numel
    if PACK:
        src = tensor_ptr + idx
        dst = bucket_ptr + offset + idx
    else:
        src = bucket_ptr + offset + idx
        dst = tensor_ptr + idx
    values = tl.load(src, mask=live)
    if PLAIN:
        out = values
    else:
        out = cast_to(values.to(ACC) * tl.load(scale_ptr), dst.dtype.element_ty)
    tl.store(dst, out, mask=live)


def _host_table(tensors) -> torch.Tensor:
    """The [4, count + 1] int64 table of `tensors` (rows _FIRST, _ADDRESS, _OFFSET, _NUMEL)."""
    numels = torch.tensor([t.numel() for t in tensors] + [0], dtype=torch.int64)
    table = torch.zeros(4, len(tensors) + 1, dtype=torch.int64)
    blocks = (numels + _BLOCK - 1) // _BLOCK
    table[_FIRST.value] = torch.cumsum(blocks, 0) - blocks
    table[_ADDRESS.value, :-1] = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    table[_OFFSET.value] = torch.cumsum(numels, 0) - numels
    table[_NUMEL.value] = numels
    return table


def _upload(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Blocking (the host table is pageable): once it returns, a later call on any
    # stream may read the copy.  Only a new parameter set gets here.
    return table.to(device)


_tables: OrderedDict = OrderedDict()


def _table(tensors, device: torch.device) -> tuple[torch.Tensor, int]:
    """The device table of `tensors` and the number of programs, from the cache when
    this parameter set (every tensor's address, numel and dtype, and the device) has
    been seen.  A table holds only addresses and sizes, so a key that matches describes
    the current tensors exactly, even where a freed tensor's memory went to a new one."""
    key = (device, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    found = _tables.get(key)
    if found is None:
        host = _host_table(tensors)
        found = (_upload(host, device), int(host[_FIRST.value, -1]))
        _tables[key] = found
        if len(_tables) > _TABLES_KEPT:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return found


def _check_bucket(op, tensors, bucket):
    """The twin of bucket_numels (csrc/args/multi_tensor.h): the tensors fill the bucket exactly."""
    for i, t in enumerate(tensors):
        C.need(t.is_contiguous(), op, f"tensors[{i}] must be contiguous")
        C.need(t.dtype == tensors[0].dtype, op, f"tensors[{i}] has dtype {t.dtype} but tensors[0] has {tensors[0].dtype}")
        C.on_device(op, f"tensors[{i}]", t, bucket)
    C.need(bucket.dim() == 1 and bucket.is_contiguous(), op, "bucket must be a contiguous 1-D tensor")
    C.floating(op, "bucket", bucket)
    total = sum(t.numel() for t in tensors)
    C.need(bucket.numel() == total, op, f"bucket has {bucket.numel()} elements but the tensors hold {total}")


def _launch(tensors, bucket, scale, pack: bool):
    _check_bucket("pack_tensors" if pack else "unpack_tensors", tensors, bucket)
    if bucket.numel() == 0:
        return
    tensor_dtype = tensors[0].dtype
    dst_dtype = bucket.dtype if pack else tensor_dtype
    acc = scale_dtype(dst_dtype)
    plain = scale == 1.0 and tensor_dtype == bucket.dtype
    table, programs = _table(tensors, bucket.device)
    scale_t = coef_tensor(bucket.device, acc, scale)
    count = len(tensors)
    _multi_tensor_copy_kernel[(programs,)](table, count, bucket, scale_t, PACK=pack, PLAIN=plain,
                                           TENSOR_DTYPE=_TL[tensor_dtype], ACC=_TL[acc], BLOCK=_BLOCK,
                                           STEPS=count.bit_length())


@triton_twin("pack_tensors")
@on_inputs_device
def pack_tensors_triton(tensors: list[torch.Tensor], bucket: torch.Tensor, scale: float) -> None:
    _launch(tensors, bucket, scale, pack=True)


@triton_twin("unpack_tensors")
@on_inputs_device
def unpack_tensors_triton(bucket: torch.Tensor, tensors: list[torch.Tensor], scale: float) -> None:
    _launch(tensors, bucket, scale, pack=False)


@triton.jit
def _gossip_mix_kernel(x_ptr, left_ptr, right_ptr, out_ptr, n, weights_ptr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < n
    x = tl.load(x_ptr + idx, mask=live).to(ACC)
    left = tl.load(left_ptr + idx, mask=live).to(ACC)
    right = tl.load(right_ptr + idx, mask=live).to(ACC)
    mixed = tl.load(weights_ptr) * x + tl.load(weights_ptr + 1) * left + tl.load(weights_ptr + 2) * right
    tl.store(out_ptr + idx, cast_to(mixed, out_ptr.dtype.element_ty), mask=live)


@triton_twin("gossip_mix")
@on_inputs_device
def gossip_mix_triton(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, w_self: float, w_left: float,
                      w_right: float, out: torch.Tensor) -> None:
    C.floating("gossip_mix", "x", x)
    for name, t in (("x", x), ("left", left), ("right", right)):
        C.shaped("gossip_mix", name, t, x.shape, x, x.dtype)
    # out may have another float dtype: the kernel rounds each value to out's on store
    C.shaped("gossip_mix", "out", out, x.shape, x)
    C.floating("gossip_mix", "out", out)
    n = x.numel()
    if n == 0:
        return
    acc = acc_dtype(x.dtype)
    weights = coef_tensor(x.device, acc, w_self, w_left, w_right)
    _gossip_mix_kernel[(triton.cdiv(n, _BLOCK),)](x, left, right, out, n, weights, ACC=_TL[acc],
                                                    BLOCK=_BLOCK)
