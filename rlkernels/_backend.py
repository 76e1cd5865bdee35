"""Backend choice shared by every op: "auto" | "cpu" | "cuda" | "triton" | "reference".

rlkernels imports only with its compiled extension, whose CPU kernels are always
built, so "cpu" is available wherever the inputs are on the CPU."""
from __future__ import annotations

import torch

from ._library import has_compiled, triton_interpreting, triton_status

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


# Order in which backend="auto" tries the GPU backends (the faster first).
_AUTO_CUDA = ("cuda", "triton")


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Returns the backend that runs `op` on `device`, or raises ValueError saying why
    the requested one cannot.  Every op implements every backend."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            for candidate in _AUTO_CUDA:
                if _usable(candidate, device) is None:
                    return candidate
        return "reference"
    why = _usable(backend, device)
    if why is not None:
        raise ValueError(f"{op}: backend={backend!r} is unavailable: {why}")
    return backend


def _usable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None where it can."""
    if backend == "cpu":
        return None if device.type == "cpu" else f"it needs CPU tensors, the inputs are on {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"it needs CUDA tensors, the inputs are on {device}"
        if not has_compiled("cuda"):
            return "this build of rlkernels has no CUDA kernels (torch without CUDA or RLKERNELS_CUDA=0 at build time)"
        return None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cpu" and not triton_interpreting():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not support device {device}"
        return None
    return None  # "reference": plain PyTorch, on any device
