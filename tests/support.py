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


def matches_truth(ours: torch.Tensor, truth: torch.Tensor, same: torch.Tensor, dtype: torch.dtype,
                  floor: float = 1e-5) -> None:
    """A result computed in `dtype` against the float64 truth: float64 within its
    tolerance row, other dtypes by the low precision rule against `same`, PyTorch's
    own result in that dtype."""
    if dtype == torch.float64:
        assert_close(ours, truth)
    else:
        low_precision_bound(ours, same, truth, floor=floor)


def import_library(module: str, install: str):
    """The library module an integration test compares against: skipped where it is
    not installed, an import error where RLKERNELS_REQUIRE_INTEGRATIONS=1 (make test
    installs TRL and verl, so a broken install fails instead of skipping)."""
    import importlib

    if os.environ.get("RLKERNELS_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{install} is not installed")


# ---- losses ----------------------------------------------------------------------------------

def _scaled_close(actual, expected, dtype, what, finite_only):
    tol = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    values = expected[torch.isfinite(expected)] if finite_only else expected
    scale = values.abs().max().item() if values.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale + 1e-12,
                               equal_nan=finite_only, msg=lambda m: f"{what}: {m}")


def scaled_close(actual, expected, dtype=torch.float32, what=""):
    """float64 comparison whose absolute tolerance is relative to the largest expected
    magnitude, so per-token gradients of 1/n_t size are checked as tightly as losses;
    `dtype` float64 picks that tolerance row, any other dtype float32's."""
    _scaled_close(actual, expected, dtype, what, finite_only=False)


def finite_scaled_close(actual, expected, dtype=torch.float32, what=""):
    """scaled_close with the scale taken over the finite expected entries only, and NaN
    equal to NaN."""
    _scaled_close(actual, expected, dtype, what, finite_only=True)


def close_stats(stats, expected, dtype, names):
    """The statistics dict of a token loss holds exactly `names`, each close to expected."""
    assert set(stats) == set(names)
    for name in names:
        finite_scaled_close(stats[name], expected[name], dtype, what=name)


def token_mask(B, T, device, kind="gaps"):
    """A (B, T) token mask with ragged starts and ends, a gap inside each row, one empty
    row and the last slot set; kind="none" gives None."""
    if kind == "none":
        return None
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b in range(B):
        start, end = b % 3, max(T - (b % 5), 0)
        mask[b, start:end] = True
        mask[b, start + (end - start) // 3: start + (end - start) // 2] = False
    mask[B // 2] = False  # an empty sequence
    if B > 1 and T > 0:
        mask[B - 1, T - 1] = True
    return mask


POISON = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])


def poisoned(x, mask):
    """x with NaN, +-inf or 1e30 in the slots the mask leaves out."""
    idx = torch.randint(0, len(POISON), x.shape, device=x.device)
    return torch.where(mask, x, POISON.to(x.device, x.dtype)[idx])


def loss_and_grad(fn, x, *args, **kw):
    """fn(x, ...) -> (loss, stats), and the gradient of loss with respect to x."""
    x = x.detach().clone().requires_grad_()
    loss, stats = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, stats, grad


# ---- logits for the arg-max (is_top1) statistics -------------------------------------------------

def tie_logits(V, device):
    """Integer logits (exact in every dtype and every summation order, so ties are
    exact) with the label placed against ties in earlier and later columns; returns
    (logits, labels)."""
    logits = torch.randint(-6, 7, (16, V), device=device).float()
    labels = torch.randint(0, V, (16,), device=device)
    rows = [
        (5, None),          # label the unique maximum
        (V - 3, 2),         # ties a maximum far before it (an earlier tile): not top-1
        (40, 38),           # ties a maximum just before it (the same tile): not top-1
        (3, V - 1),         # ties a maximum after it (a later tile): top-1
        (20, 21),           # ties a maximum just after it: top-1
        (0, 1),             # column 0 tied with column 1: top-1
        (V - 1, 0),         # the last column tied with column 0: not top-1
    ]
    for i, (label, tie) in enumerate(rows):
        logits[i].clamp_(max=6)
        logits[i, label] = 9
        if tie is not None:
            logits[i, tie] = 9
        labels[i] = label
    logits[7, :] = 4                 # every column equal: only column 0 is top-1
    labels[7] = 0
    logits[8, :] = 4
    labels[8] = 1
    logits[9, 11] = 10               # second largest by one
    logits[9, 12] = 9
    labels[9] = 12
    labels[10] = -100                # ignored
    logits[11, 17] = 8               # the label is the maximum, one below in another tile
    logits[11, V - 2] = 7
    labels[11] = 17
    return logits, labels


class RankSuites:
    """Runs a suite of named checks once per world size on local gloo ranks (start-up
    paid once) and reports each check of each world as its own test."""

    def __init__(self, run_suite, checks, *, timeout_s: float, pg_timeout_s: float):
        self.run_suite, self.names = run_suite, list(checks)
        self.timeout_s, self.pg_timeout_s = timeout_s, pg_timeout_s
        self._results: dict = {}

    def check(self, world: int, name: str) -> None:
        from rlkernels.distributed._launch import run_ranks

        if world not in self._results:
            self._results[world] = run_ranks(self.run_suite, world, args=(self.names,), timeout_s=self.timeout_s,
                                             pg_timeout_s=self.pg_timeout_s)
        results = self._results[world]
        crashed = [f"--- rank {r.rank} ---\n{r.error}" for r in results if not r.ok]
        assert not crashed, "\n".join(crashed)
        failures = [f"--- rank {r.rank} ---\n{r.value[name]}" for r in results if r.value[name] is not None]
        assert not failures, "\n".join(failures)
