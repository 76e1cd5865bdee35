"""Pack/unpack between many tensors and one flat bucket, and the gossip mixing step,
in Triton.  One launch covers every tensor: the tensors' addresses travel in an int64
table and each program copies one block of one tensor (a flat list of (tensor,
block) work items, so a single large tensor and a thousand small ones both keep
every program busy)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype
from ..ops._registry import triton_twin
from . import _checks as C
from ._common import cast_to, coef_tensor, on_inputs_device
from ..reference.multi_tensor import scale_dtype

_BLOCK = 2048

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
       torch.bfloat16: tl.bfloat16}


@triton.jit
def _multi_tensor_copy_kernel(addresses_ptr, offsets_ptr, numels_ptr, work_tensor_ptr, work_block_ptr,
                              bucket_ptr, scale_ptr, PACK: tl.constexpr, PLAIN: tl.constexpr,
                              TENSOR_DTYPE: tl.constexpr, ACC: tl.constexpr,
                              BLOCK: tl.constexpr):
    item = tl.program_id(0)
    t = tl.load(work_tensor_ptr + item)
    block = tl.load(work_block_ptr + item).to(tl.int64)
    numel = tl.load(numels_ptr + t)
    offset = tl.load(offsets_ptr + t)
    tensor_ptr = tl.load(addresses_ptr + t).to(tl.pointer_type(TENSOR_DTYPE))
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


def _work_items(tensors, device):
    """Per tensor: its start in the bucket; per work item: (tensor index, block index)."""
    numels = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    offsets = torch.cumsum(numels, 0) - numels
    blocks = (numels + _BLOCK - 1) // _BLOCK
    work_tensor = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    work_block = (torch.arange(work_tensor.numel(), dtype=torch.int64) - first[work_tensor.long()]).to(torch.int32)
    addresses = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    table = [addresses, offsets, numels, work_tensor, work_block]
    return [x.to(device, non_blocking=True) for x in table], int(work_tensor.numel())


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
    table, items = _work_items(tensors, bucket.device)
    scale_t = coef_tensor(bucket.device, acc, scale)
    _multi_tensor_copy_kernel[(items,)](*table, bucket, scale_t, PACK=pack, PLAIN=plain,
                                       TENSOR_DTYPE=_TL[tensor_dtype], ACC=_TL[acc], BLOCK=_BLOCK)


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
