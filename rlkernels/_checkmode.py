"""The checked mode: whether the public ops may read tensor data on the host to check it.

Checks such as "labels lie in [0, V)" or "the mask holds only 0 and 1" need the
tensor's values.  On CPU tensors reading them costs little, so those checks always
run there.  On CUDA tensors every such read is a device-to-host copy that waits for
the GPU (a sync: the CPU stops queueing work, and a CUDA graph capture fails), so
by default the ops skip them there and the kernels give a documented result for bad
values instead (docs/numerics.md, "Bad data on CUDA").  The checked mode brings the
checks back on CUDA, with the same errors as on the CPU:

    RLKERNELS_CHECK=1 python train.py          # on for the whole process (read at import)
    rlkernels.set_checks(True)                 # on from now; returns the previous setting
    with rlkernels.checked():                  # on inside the block only
        ...
    with rlkernels.checked(False):             # off inside the block
        ...

The setting is process-wide (not per thread).  torch.compile traces never read data,
whatever the setting."""
from __future__ import annotations

import contextlib
import os

import torch

_TRUE = ("1", "true", "yes", "on")


def _from_env() -> bool:
    return os.environ.get("RLKERNELS_CHECK", "0").strip().lower() in _TRUE


_enabled = _from_env()


def checks_enabled() -> bool:
    """Whether the checked mode is on (data checks on CUDA tensors too)."""
    return _enabled


def set_checks(enabled: bool) -> bool:
    """Turns the checked mode on or off for the whole process; returns the previous setting."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_checks: enabled must be a bool, got {type(enabled).__name__}")
    previous, _enabled = _enabled, enabled
    return previous


@contextlib.contextmanager
def checked(enabled: bool = True):
    """The checked mode on (or off, with False) inside a `with` block; the previous setting after it."""
    previous = set_checks(enabled)
    try:
        yield
    finally:
        set_checks(previous)


def reads_data(t: torch.Tensor) -> bool:
    """Whether an op may read `t`'s values on the host: never while torch.compile traces;
    otherwise always for tensors off the GPU, and for CUDA tensors in the checked mode only."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type != "cuda" or _enabled
