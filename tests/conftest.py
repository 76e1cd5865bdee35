"""Shared test settings: devices, backends, dtypes, tolerances and seeds.

Without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set
here before triton is imported); with one they are compiled and run on it, as users
run them (set TRITON_INTERPRET=1 yourself to interpret there too).  CUDA cases run
when a GPU is present and skip otherwise."""
from __future__ import annotations

import os

import torch  # noqa: E402

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


@pytest.fixture(params=BACKEND_DEVICE, ids=backend_id)
def backend_device(request):
    return request.param


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group (FileStore, 10 s timeout) for the duration of a test."""
    import datetime

    import torch.distributed as dist

    store = dist.FileStore(os.fspath(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=10))
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


# --- trainers (issue 6) ---
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a learning test that takes tens of seconds (runs by default; "
                                       "deselect with -m 'not slow')")
    config.addinivalue_line("markers", "interpreter_heavy(predicate): cases, chosen by predicate(params), that "
                                       "are too slow for the Triton interpreter; not collected for Triton on "
                                       "CPU tensors, still run on a GPU")


def pytest_collection_modifyitems(config, items):
    """Drops the interpreter_heavy cases of backend_device=("triton", "cpu")."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("interpreter_heavy")
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if marker and params.get("backend_device") == ("triton", "cpu") and marker.args[0](params):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# --- integrations (issue 6) ---
def import_library(module: str, install: str):
    """The library module an integration test compares against: skipped where it is
    not installed, an import error where RLKERNELS_REQUIRE_INTEGRATIONS=1 (make test
    installs TRL and verl, so a broken install fails instead of skipping)."""
    import importlib

    if os.environ.get("RLKERNELS_REQUIRE_INTEGRATIONS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{install} is not installed")
