"""Fused multi-tensor ops behind parameter averaging (rlkernels.distributed):

- pack_tensors: many tensors -> one flat bucket, optionally scaled and cast
  (e.g. to bfloat16 for a compressed all-reduce), in one kernel launch;
- unpack_tensors: the bucket -> back into the tensors, in place, optionally scaled
  (e.g. by 1/world_size for the mean);
- gossip_mix: out = w_self * x + w_left * left + w_right * right.

The scaled copy multiplies in float64 for float32/float64 destinations and in float32
for 16-bit ones, then rounds once: `sum * (1/n)` equals `sum / n` bit for bit for
float32, float16 and bfloat16 (float64 may differ in the last bit)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _backend, _overlap, _validate as V, reference
from .._library import _C
from . import _registry

__all__ = ["pack_tensors", "unpack_tensors", "gossip_mix"]

_PACK = "pack_tensors"
_UNPACK = "unpack_tensors"
_MIX = "gossip_mix"


def _written(*tensors: torch.Tensor) -> None:
    """Bumps the version counters of tensors a kernel op (compiled or Triton) wrote in
    place, as every in-place PyTorch op does: a graph that saved one of them then raises
    in backward instead of using the new values."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(tensors)


def _writable(t: torch.Tensor) -> bool:
    """Whether a kernel can write `t`'s values straight into its memory: contiguous, and
    not a negated or conjugate view (whose bytes are not its values).  Other tensors are
    written through a plain copy, then copied in.  (torch.compile cannot trace is_neg:
    its graphs hold no such views.)"""
    if torch.compiler.is_compiling():
        return t.is_contiguous()
    return t.is_contiguous() and not t.is_neg() and not t.is_conj()


def _tensor_list(op: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        V.float_tensor(op, f"tensors[{i}]", t)
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"{op}: tensors must share one dtype: tensors[0] is {tensors[0].dtype}, "
                            f"tensors[{i}] is {t.dtype}")
        if t.device != tensors[0].device:
            raise ValueError(f"{op}: tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}")
    return list(tensors)


def _clear(bucket, tensors, *, distinct: bool) -> bool:
    """True where every check of _tensor_list, the contiguity and the overlap checks below
    would pass (one compiled call, _C.multi_tensor_clear: the Python checks cost 1-2 us a
    tensor); False sends the call through them, and their exact errors.  Eager calls only
    (no addresses while torch.compile traces)."""
    return (_C is not None and isinstance(bucket, torch.Tensor) and isinstance(tensors, (list, tuple))
            and not torch.compiler.is_compiling() and _C.multi_tensor_clear(bucket, tensors, distinct))


def _scale(op: str, scale) -> float:
    return V.number(op, "scale", scale, finite=True)


def _bucket(op: str, bucket, total: int, device) -> torch.Tensor:
    V.float_tensor(op, "bucket", bucket, ndim=1)
    if bucket.numel() != total:
        raise ValueError(f"{op}: bucket must have {total} elements (the tensors' total), got {bucket.numel()}")
    if device is not None and bucket.device != device:
        raise ValueError(f"{op}: bucket is on {bucket.device} but the tensors are on {device}")
    if not bucket.is_contiguous():
        raise ValueError(f"{op}: bucket must be contiguous")
    return bucket


def _sharing_bucket(bucket: torch.Tensor, tensors: list[torch.Tensor]):
    """Yields (i, tensor) for the tensors that may share memory with the bucket other
    than as their own slice of it (a tensor may be its own slice: the copy is then
    elementwise in place).  Tensors whose bytes lie outside the bucket cost one test."""
    offset = 0
    region = _overlap.span(bucket)
    for i, t in enumerate(tensors):
        start, offset = offset, offset + t.numel()
        if t.device == bucket.device and _overlap.outside(t, region):
            continue
        own = bucket[start:offset].view(t.shape) if t.dtype == bucket.dtype else None
        if own is None or _overlap.status(own, t) != _overlap.FULL:
            yield i, t


def pack_tensors(tensors: Sequence[torch.Tensor], *, out: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Flattens `tensors` (one dtype, one device) into one 1-D bucket holding
    `tensors[0].flatten() * scale, tensors[1].flatten() * scale, ...`, cast to `dtype`
    (default: the tensors' dtype) or written into `out` (a contiguous 1-D tensor of
    the total element count, whose dtype then decides).  Returns the bucket."""
    clear = isinstance(out, torch.Tensor) and _clear(out, tensors, distinct=False)
    if not clear:
        tensors = _tensor_list(_PACK, tensors)
    scale = _scale(_PACK, scale)
    total = sum(t.numel() for t in tensors)
    device = tensors[0].device if tensors else (out.device if isinstance(out, torch.Tensor) else None)
    if out is None:
        if dtype is None:
            dtype = tensors[0].dtype if tensors else torch.float32
        if dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"{_PACK}: dtype must be one of {V.FLOAT_DTYPES}, got {dtype}")
        out = torch.empty(total, dtype=dtype, device=device or "cpu")
    else:
        _bucket(_PACK, out, total, device)
        if dtype is not None and dtype != out.dtype:
            raise TypeError(f"{_PACK}: dtype={dtype} disagrees with out's dtype {out.dtype}")
    if total == 0:
        return out
    contiguous = tensors if clear else [t.contiguous() for t in tensors]
    if not clear:
        for i, t in _sharing_bucket(out, contiguous):
            _overlap.check_output(_PACK, "out", out, f"tensors[{i}]", t, allow_full=False)
    chosen = _backend.resolve(_PACK, backend, out.device)
    bucket = out if _writable(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    with torch.no_grad():
        if chosen == "reference":
            reference.pack_tensors(contiguous, bucket, scale)
        else:
            _registry.kernel("pack_tensors", chosen)(contiguous, bucket, scale)
            _written(bucket)
        if bucket is not out:
            out.copy_(bucket)
    return out


def unpack_tensors(bucket: torch.Tensor, tensors: Sequence[torch.Tensor], *, scale: float = 1.0,
                   backend: str = "auto") -> None:
    """Writes `bucket[offset_i : offset_i + numel_i] * scale` into `tensors[i]` in place
    (cast to the tensors' dtype), the inverse of pack_tensors.  Non-contiguous targets
    are filled through a contiguous copy."""
    clear = _clear(bucket, tensors, distinct=True)
    if not clear:
        tensors = _tensor_list(_UNPACK, tensors)
    scale = _scale(_UNPACK, scale)
    total = sum(t.numel() for t in tensors)
    _bucket(_UNPACK, bucket, total, tensors[0].device if tensors else None)
    if total == 0:
        return
    if clear:
        targets = tensors
    else:
        targets = [t if _writable(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        for i, t in _sharing_bucket(bucket, targets):
            _overlap.check_output(_UNPACK, f"tensors[{i}]", t, "bucket", bucket, allow_full=False)
        shared = _overlap.first_shared(targets)
        if shared is not None:
            j, i = shared
            _overlap.check_output(_UNPACK, f"tensors[{i}]", targets[i], f"tensors[{j}]", targets[j],
                                  allow_full=False)
    chosen = _backend.resolve(_UNPACK, backend, bucket.device)
    with torch.no_grad():
        if chosen == "reference":
            reference.unpack_tensors(bucket, targets, scale)
        else:
            _registry.kernel("unpack_tensors", chosen)(bucket, targets, scale)
            _written(*targets)
        for t, target in zip(tensors, targets):
            if t is not target:
                t.copy_(target)


def gossip_weights(op: str, weights) -> tuple[float, float, float]:
    """Validates (w_self, w_left, w_right): non-negative numbers summing to 1 (so the
    mixing keeps the mean)."""
    if not isinstance(weights, (tuple, list)) or len(weights) != 3:
        raise TypeError(f"{op}: weights must be a tuple (w_self, w_left, w_right), got {weights!r}")
    names = ("w_self", "w_left", "w_right")
    values = tuple(V.number(op, f"weights.{n}", w, low=0.0) for n, w in zip(names, weights))
    # added left to right, as the compiled usual call does (built-in sum() compensates its
    # rounding from Python 3.12 on, which would move the boundary by an ulp)
    total = (values[0] + values[1]) + values[2]
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{op}: weights must sum to 1 (so the mixing keeps the mean), got {total!r}")
    return values


def gossip_mix(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
               weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3), *, out: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """One gossip mixing step, `w_self * x + w_left * left + w_right * right` with
    `weights = (w_self, w_left, w_right)` (non-negative, summing to 1), computed in
    float32 (float64 stays float64) and rounded once to x's dtype.  `out` may be x
    itself (in place).  x, left, right and out share shape, dtype and device."""
    if not torch.compiler.is_compiling() and _C is not None:
        # The usual call, checked and run in one compiled call (csrc/usual_calls.cpp); None
        # where any argument is of another kind, which the checks below handle.
        done = _C.gossip_mix_usual(x, left, right, weights, out, backend)
        if done is not None:
            return done
    V.float_tensor(_MIX, "x", x)
    for name, t in (("left", left), ("right", right)) + ((("out", out),) if out is not None else ()):
        V.tensor(_MIX, name, t)
        V.same_dtype(_MIX, name, t, "x", x)
        V.same_shape(_MIX, name, t, "x", x)
    device = V.same_device(_MIX, x=x, left=left, right=right, out=out)
    w_self, w_left, w_right = gossip_weights(_MIX, weights)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    target = out if _writable(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    for name, t in (("x", x), ("left", left), ("right", right)):
        # the kernel reads t.contiguous(): a copy (no sharing) unless t already is contiguous
        _overlap.check_output(_MIX, "out", target, name, t.contiguous(), allow_full=True)
    chosen = _backend.resolve(_MIX, backend, device)
    with torch.no_grad():
        if chosen == "reference":
            target.copy_(reference.gossip_mix(x, left, right, w_self, w_left, w_right))
        else:
            mix = _registry.kernel("gossip_mix", chosen)
            mix(x.contiguous(), left.contiguous(), right.contiguous(), w_self, w_left, w_right, target)
            _written(target)
        if target is not out:
            out.copy_(target)
    return out


def _pack_fake(tensors, bucket, scale):
    torch._check(bucket.dim() == 1, lambda: "bucket must be 1-D")
    torch._check(bucket.numel() == sum(t.numel() for t in tensors), lambda: "bucket size must match the tensors")
    return None


def _unpack_fake(bucket, tensors, scale):
    torch._check(bucket.dim() == 1, lambda: "bucket must be 1-D")
    torch._check(bucket.numel() == sum(t.numel() for t in tensors), lambda: "bucket size must match the tensors")
    return None


def _gossip_mix_fake(x, left, right, w_self, w_left, w_right, out):
    torch._check(left.shape == x.shape and right.shape == x.shape and out.shape == x.shape,
                 lambda: "x, left, right and out must share one shape")
    return None


_registry.register("pack_tensors", fake=_pack_fake)
_registry.register("unpack_tensors", fake=_unpack_fake)
_registry.register("gossip_mix", fake=_gossip_mix_fake)
