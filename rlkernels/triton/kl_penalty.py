"""KL penalty estimators in Triton: one elementwise pass writing the value and
its slope d value / d logprob (see csrc/core/kl_penalty.h for the formulas)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype
from ..ops._registry import triton_twin
from . import _checks as C
from ._common import on_inputs_device

KIND_CODES = {"k1": 0, "kl": 0, "k2": 1, "mse": 1, "k3": 2, "low_var_kl": 2, "abs": 3, "k1+": 4, "k3+": 5}


@triton.jit
def _kl_penalty_kernel(lp_ptr, ref_ptr, value_ptr, slope_ptr, n, clamp, KIND: tl.constexpr, CLAMP: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    acc = value_ptr.dtype.element_ty
    r = tl.load(lp_ptr + offs, mask=live, other=0.0).to(acc) - tl.load(ref_ptr + offs, mask=live, other=0.0).to(acc)
    if KIND == 1:
        v = 0.5 * r * r
        d = r
    elif KIND == 3:
        v = tl.where(r < 0, -r, r)
        d = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, r * 0.0)).to(acc)
    elif KIND == 2 or KIND == 5:
        c = -r
        inside = (c >= -20.0) & (c <= 20.0)
        cc = tl.where(c < -20.0, -20.0, tl.where(c > 20.0, 20.0, c)).to(acc)
        ratio = tl.exp(cc)
        v = ratio - cc - 1.0
        d = tl.where(inside, 1.0 - ratio, 0.0).to(acc)
    else:
        v = r
        d = tl.full([BLOCK], 1.0, acc)  # not r * 0 + 1: NaN at r = +-inf
    if CLAMP:
        inside = (v >= -clamp) & (v <= clamp)
        v = tl.where(v < -clamp, -clamp, tl.where(v > clamp, clamp, v)).to(acc)
        d = tl.where(inside, d, 0.0).to(acc)
    if KIND == 4 or KIND == 5:
        d = r
    tl.store(value_ptr + offs, v, mask=live)
    tl.store(slope_ptr + offs, d, mask=live)


@triton_twin("kl_penalty")
@on_inputs_device
def kl_penalty_triton(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str,
                      clamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    C.known("kl_penalty", "kind", kind, KIND_CODES)
    C.positive("kl_penalty", "clamp", clamp)
    C.floating("kl_penalty", "logprobs", logprobs)
    C.need(ref_logprobs.shape == logprobs.shape and ref_logprobs.dtype == logprobs.dtype, "kl_penalty",
           "ref_logprobs must have the shape and dtype of logprobs")
    C.on_device("kl_penalty", "ref_logprobs", ref_logprobs, logprobs)
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    dtype = acc_dtype(lp.dtype)
    value = torch.empty(lp.shape, dtype=dtype, device=lp.device)
    slope = torch.empty(lp.shape, dtype=dtype, device=lp.device)
    n = lp.numel()
    if n > 0:
        block = 1024
        _kl_penalty_kernel[(triton.cdiv(n, block),)](
            lp, ref, value, slope, n, clamp if clamp != float("inf") else 0.0, KIND=KIND_CODES[kind],
            CLAMP=clamp != float("inf"), BLOCK=block)
    return value, slope
