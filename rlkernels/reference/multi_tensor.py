"""Parameter averaging building blocks in plain PyTorch: pack many tensors into one
flat bucket and back (scaled, with a dtype cast), and one gossip mixing step.

The scaled copy multiplies in float64 when the destination is float32/float64
and in float32 when it is float16/bfloat16, then rounds once to the destination
dtype; the kernels do the same, so they agree bit for bit."""
from __future__ import annotations

from typing import Sequence

import torch

from .._dtypes import acc_dtype

__all__ = ["pack_tensors", "unpack_tensors", "gossip_mix"]

_HALF = (torch.float16, torch.bfloat16)


def scale_dtype(dst: torch.dtype) -> torch.dtype:
    """The dtype a scaled copy into `dst` multiplies in."""
    return torch.float32 if dst in _HALF else torch.float64


def _scaled(values: torch.Tensor, dst: torch.dtype, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return values.to(dst)
    acc = scale_dtype(dst)
    return (values.to(acc) * torch.tensor(scale, dtype=acc)).to(dst)


def pack_tensors(tensors: Sequence[torch.Tensor], bucket: torch.Tensor, scale: float = 1.0) -> None:
    """bucket[offset_i : offset_i + numel_i] = tensors[i].flatten() * scale, cast to bucket's dtype."""
    offset = 0
    for t in tensors:
        n = t.numel()
        bucket[offset:offset + n] = _scaled(t.reshape(-1), bucket.dtype, scale)
        offset += n


def unpack_tensors(bucket: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """tensors[i] = bucket[offset_i : offset_i + numel_i].view_as(tensors[i]) * scale, in place."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(_scaled(bucket[offset:offset + n], t.dtype, scale).view(t.shape))
        offset += n


def gossip_mix(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, w_self: float, w_left: float,
               w_right: float) -> torch.Tensor:
    """w_self * x + w_left * left + w_right * right, in float32 (float64 stays float64)."""
    acc = acc_dtype(x.dtype)
    mixed = w_self * x.to(acc) + w_left * left.to(acc) + w_right * right.to(acc)
    return mixed.to(x.dtype)
