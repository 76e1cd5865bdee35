"""Argument checks shared by every public op.  Each raises TypeError (wrong type or
dtype) or ValueError (wrong shape, device or range) naming the argument."""
from __future__ import annotations

from typing import Iterable

import torch

from . import _checkmode

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(op: str, name: str, value, *, dtypes: Iterable[torch.dtype] | None = None,
           ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(value.shape)}")
    return value


def float_tensor(op: str, name: str, value, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    # The passing case in one test (every tensor argument of every call comes here); the
    # messages of the failing ones come from tensor().
    if isinstance(value, torch.Tensor) and value.dtype in FLOAT_DTYPES and (ndim is None or value.dim() == ndim) \
            and (min_ndim is None or value.dim() >= min_ndim):
        return value
    return tensor(op, name, value, dtypes=FLOAT_DTYPES, ndim=ndim, min_ndim=min_ndim)


def as_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` in `dtype`, contiguous: itself where it already is (a no-op Tensor.to
    still costs a microsecond or more a call)."""
    if value.dtype != dtype:
        value = value.to(dtype)
    return value.contiguous()


def same_shape(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}")


def same_dtype(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")


def same_device(op: str, **tensors) -> torch.device:
    device = None
    first = None
    for name, value in tensors.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(value).__name__}")
        if device is None:
            device, first = value.device, name
        elif value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device} but {first} is on {device}")
    return device


INF = float("inf")


def is_inf(value: float) -> bool:
    # Comparisons rather than math.isinf/isnan: torch.compile with dynamic shapes traces
    # Python floats as symbolic values, which the math functions cannot take.
    return value == INF or value == -INF


def number(op: str, name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, finite: bool = False) -> float:
    if type(value) is not float:  # a float needs no conversion (most calls)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float64's range
            raise ValueError(f"{op}: {name} is out of range, got {value}") from None
    if value != value:
        raise ValueError(f"{op}: {name} must not be NaN")
    if finite and is_inf(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{op}: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{op}: {name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def integer(op: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """A Python int (not a bool) in [low, high]; ids that reach a kernel must fit int64."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    low = -2**63 if low is None else low
    high = 2**63 - 1 if high is None else high
    if not low <= value <= high:
        raise ValueError(f"{op}: {name} must lie in [{low}, {high}], got {value}")
    return value


def flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def choice(op: str, name: str, value, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value


def binary_mask(op: str, name: str, mask, shape: torch.Size, device: torch.device | None = None) -> torch.Tensor | None:
    """Validates a 0/1 mask of `shape` and returns it as a contiguous bool tensor.
    A bool mask costs no pass; other dtypes are checked to hold only 0 and 1 where the
    data may be read (CPU tensors, or the checked mode: _checkmode.py); elsewhere any
    non-zero value counts as True."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the inputs are on {device}")
    if mask.dtype == torch.bool:
        return mask.contiguous()
    if mask.is_complex():
        raise TypeError(f"{op}: {name} must be bool, integer or floating, got {mask.dtype}")
    as_bool = mask != 0
    if mask.numel() > 0 and _checkmode.reads_data(mask) and bool((as_bool & (mask != 1)).any()):
        raise ValueError(f"{op}: {name} must hold only 0 and 1 (or be bool)")
    return as_bool.contiguous()
