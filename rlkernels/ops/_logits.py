"""Validation and backend choice shared by the ops over [..., V] logits
(logprobs, kl_from_logits, linear_logprobs)."""
from __future__ import annotations

import torch

from .. import _backend, _checkmode, _validate as V

# Dtypes the compiled and Triton kernels read; float64 runs on the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGIT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def logits_tensor(op: str, name: str, value) -> torch.Tensor:
    V.tensor(op, name, value, dtypes=LOGIT_DTYPES, min_ndim=1)
    return value


# The smallest temperature: below the smallest normal float32 the kernels' 1/T and
# log2(e)/T overflow float32 (inf, then NaN results).
MIN_TEMPERATURE = 2.0 ** -126


def temperature(op: str, value) -> float:
    value = V.number(op, "temperature", value, low=0.0, low_open=True, finite=True)
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{op}: temperature must be at least 2**-126 (~1.18e-38, the smallest normal float32) so "
                         f"that 1/temperature fits in float32, got {value}")
    return value


def index(op: str, name: str, value) -> int:
    return V.integer(op, name, value)


def labels_for(op: str, labels, logits: torch.Tensor, ignore_index: int, *, vocab: int | None = None,
               logits_name: str = "logits", check_range: bool = True) -> torch.Tensor:
    """Checks labels of logits' leading shape with values in [0, V) or ignore_index, and
    returns them as contiguous int64.  The range check (label_range; skipped with
    check_range=False) reads the labels, so it runs only where that is cheap or asked
    for (CPU tensors, or the checked mode on CUDA: _checkmode.py) and never while
    torch.compile traces; elsewhere the kernels' own handling remains (the CPU ops
    raise, the CUDA and Triton ops give NaN: docs/numerics.md)."""
    V.tensor(op, "labels", labels, dtypes=V.INDEX_DTYPES)
    lead = logits.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"{op}: labels must have the leading shape of {logits_name} {tuple(lead)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels is on {labels.device} but {logits_name} is on {logits.device}")
    if check_range:
        label_range(op, labels, logits.shape[-1] if vocab is None else vocab, ignore_index)
    return V.as_dtype(labels, torch.int64)


def label_range(op: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The ValueError of labels outside [0, vocab) that are not ignore_index, naming the
    first; on tensors whose data may be read (see labels_for)."""
    if labels.numel() > 0 and _checkmode.reads_data(labels):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            where = int(bad.flatten().nonzero()[0, 0])
            value = int(labels.flatten()[where])
            raise ValueError(f"{op}: labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"got {value} at flat index {where}")


def choose_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend for logits of `dtype`: float64 runs on the reference (the kernels
    read float32, bfloat16 and float16), which backend="auto" picks by itself."""
    chosen = _backend.resolve(op, backend, device)
    if dtype == torch.float64 and chosen != "reference":
        if backend != "auto":
            raise TypeError(f"{op}: backend={backend!r} reads float32, bfloat16 or float16 logits; "
                            "float64 runs on backend='reference'")
        return "reference"
    return chosen


def lm_head(op: str, hidden, weight, bias, *, hidden_ndim: int | None = None, rows: str = "V") -> torch.device:
    """Checks hidden [..., H] (or exactly `hidden_ndim` dims), the lm-head weight [rows, H]
    and bias [rows] (or None): floating dtypes the kernels read, one dtype, one device.
    Returns the device."""
    if hidden_ndim is None:
        V.tensor(op, "hidden", hidden, dtypes=LOGIT_DTYPES, min_ndim=1)
    else:
        V.tensor(op, "hidden", hidden, dtypes=LOGIT_DTYPES, ndim=hidden_ndim)
    V.tensor(op, "weight", weight, dtypes=LOGIT_DTYPES, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must have shape [{rows}, {hidden.shape[-1]}] (hidden size last), "
                         f"got {tuple(weight.shape)}")
    V.same_dtype(op, "weight", weight, "hidden", hidden)
    if bias is not None:
        V.tensor(op, "bias", bias, dtypes=LOGIT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        V.same_dtype(op, "bias", bias, "hidden", hidden)
    return V.same_device(op, hidden=hidden, weight=weight, bias=bias)


def logits_pair(op: str, logits, ref_logits, mask):
    """Checks two [..., V] logits of one shape, dtype and device and a 0/1 mask of their
    leading shape; returns (device, mask as bool or None)."""
    logits_tensor(op, "logits", logits)
    logits_tensor(op, "ref_logits", ref_logits)
    V.same_shape(op, "ref_logits", ref_logits, "logits", logits)
    V.same_dtype(op, "ref_logits", ref_logits, "logits", logits)
    device = V.same_device(op, logits=logits, ref_logits=ref_logits)
    return device, V.binary_mask(op, "mask", mask, logits.shape[:-1], device)
