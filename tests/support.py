"""Helpers the test files share: devices, backends, tolerances and comparisons.

Without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set here,
before triton is first imported); with one they are compiled and run on it, as users
run them (set TRITON_INTERPRET=1 yourself to interpret there too).  CUDA cases run
when a GPU is present and skip otherwise.  Fixtures and pytest hooks live in
conftest.py; property-test helpers (hypothesis) in property_support.py."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rlkernels  # noqa: E402

# Absolute/relative tolerances for outputs compared with a float64 reference,
# keyed by the dtype the op computed in (float32 accumulation for 16-bit inputs).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
# Low precision rule (flash-attention's): our error against the float64 truth may be
# at most LOW_PRECISION_FACTOR x PyTorch's own same-dtype error, plus a floor.
LOW_PRECISION_FACTOR = 2.0


def backends_for(device: str) -> list[str]:
    """Compiled and Triton backends runnable on `device` in this environment."""
    out = []
    if device == "cpu":
        out.append("cpu")
    elif rlkernels._library.has_compiled("cuda"):
        out.append("cuda")
    if rlkernels.HAS_TRITON and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton kernels can run on CPU tensors (opcheck of the *_triton ops uses CPU samples).
TRITON_ON_CPU = "triton" in backends_for("cpu")
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for(d)]


def backend_id(param) -> str:
    return f"{param[0]}-{param[1]}" if isinstance(param, tuple) else str(param)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 mask: torch.Tensor | None = None, msg: str = "") -> None:
    """Compares in float64; `dtype` picks the tolerance row (defaults to actual's)."""
    tol = TOLERANCES[dtype or actual.dtype]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if mask is not None:
        mask = mask.bool().cpu()
        actual, expected = actual[mask], expected[mask]
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=msg or None, **tol)


def low_precision_bound(ours: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor,
                        floor: float = 1e-6) -> None:
    """max|ours - truth| <= LOW_PRECISION_FACTOR * max|torch_same_dtype - truth| + floor."""
    assert ours.shape == truth.shape, f"shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    truth = truth.double().cpu()
    ours_err = (ours.double().cpu() - truth).abs().max().item()
    torch_err = (torch_same_dtype.double().cpu() - truth).abs().max().item()
    assert ours_err <= LOW_PRECISION_FACTOR * torch_err + floor, (
        f"error {ours_err:.3e} exceeds {LOW_PRECISION_FACTOR} x PyTorch's {torch_err:.3e}")


def import_library(module: str, install: str):
    """The library module an integration test compares against: skipped where it is
    not installed, an import error where RLKERNELS_REQUIRE_INTEGRATIONS=1 (make test
    installs TRL and verl, so a broken install fails instead of skipping)."""
    import importlib

    if os.environ.get("RLKERNELS_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{install} is not installed")
