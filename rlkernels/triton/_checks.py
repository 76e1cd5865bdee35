"""Argument checks of the Triton ops, the twins of csrc/args/*.h.

Every registered op is public: torch.ops.rlkernels.<op>_triton skips the Python
layer, and torch.compile traces past that layer's data checks.  So each Triton op
checks, before it launches, what its kernels address: shapes, dtypes, devices and
layouts of every tensor (metadata only, no data read, no device sync).  Ids read
from tensor data (labels, group ids) are checked in the kernels themselves.  The
errors are RuntimeError, as the compiled ops' TORCH_CHECK raise."""
from __future__ import annotations

import math

import torch

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOGIT_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def need(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise RuntimeError(f"{op}: {message}")


def floating(op: str, name: str, t: torch.Tensor, dtypes=FLOATS) -> None:
    need(t.dtype in dtypes, op, f"{name} must have a dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")


def on_device(op: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    need(t.device == like.device, op, f"{name} is on {t.device} but the inputs are on {like.device}")


def shaped(op: str, name: str, t: torch.Tensor, shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """A contiguous tensor of `shape` on like's device (and of `dtype` when given)."""
    need(tuple(t.shape) == tuple(shape), op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    need(t.is_contiguous(), op, f"{name} must be contiguous")
    on_device(op, name, t, like)
    if dtype is not None:
        need(t.dtype == dtype, op, f"{name} must be {dtype}, got {t.dtype}")


def rows(op: str, name: str, t: torch.Tensor) -> tuple[int, int]:
    """A contiguous floating [B, T] tensor; returns (B, T)."""
    need(t.dim() == 2, op, f"{name} must be [B, T], got shape {tuple(t.shape)}")
    need(t.is_contiguous(), op, f"{name} must be contiguous")
    floating(op, name, t)
    return t.shape[0], t.shape[1]


def optional_mask(op: str, name: str, mask: torch.Tensor | None, shape, like: torch.Tensor) -> None:
    if mask is not None:
        shaped(op, name, mask, shape, like, torch.bool)


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def labels(op: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    need(logits.dim() >= 1, op, "logits must have a vocabulary dimension")
    floating(op, "logits", logits, LOGIT_FLOATS)
    shaped(op, "labels", labels, logits.shape[:-1], logits, torch.int64)


def row_floats(op: str, name: str, t: torch.Tensor, logits: torch.Tensor, per_row: int) -> None:
    """A contiguous float32 tensor with `per_row` values for each row of logits."""
    n = math.prod(logits.shape[:-1]) * per_row
    need(t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n, op,
         f"{name} must be a contiguous float32 tensor with {per_row} value(s) per row of logits ({n} in all), "
         f"got {t.dtype} of shape {tuple(t.shape)}")
    on_device(op, name, t, logits)


def positive(op: str, name: str, value: float) -> None:
    need(value > 0, op, f"{name} must be > 0, got {value}")


def known(op: str, name: str, value: str, options) -> None:
    need(value in options, op, f"unknown {name} {value!r}; one of {tuple(options)}")
