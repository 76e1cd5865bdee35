"""Loads the compiled extension and answers which backends this build has.
Everything is computed once at import, so torch.compile traces the checks as
constants."""
from __future__ import annotations

import os

import torch  # noqa: F401  (loads libc10 and libtorch before the extension)

try:
    from . import _C  # registers every rlkernels:: op with the dispatcher

    _IMPORT_ERROR = ""
    BUILD_INFO: dict = dict(_C.build_info())
except ImportError as exc:  # pragma: no cover - only for broken installs
    _C = None
    _IMPORT_ERROR = str(exc)
    BUILD_INFO = {"backends": []}

COMPILED_BACKENDS = frozenset(BUILD_INFO["backends"])
# The logits kernels' vocabulary chunk (kVocabChunk, csrc/core/logprobs.h): every backend
# reduces a row as chunks this wide, each from an empty state.  The one Python copy of it.
VOCAB_CHUNK: int = int(BUILD_INFO.get("vocab_chunk", 8192))

try:
    import triton  # noqa: F401

    TRITON_IMPORTABLE, TRITON_WHY = True, ""
except Exception as exc:  # pragma: no cover - depends on the environment
    TRITON_IMPORTABLE, TRITON_WHY = False, f"triton is not importable ({exc}); pip install triton"


def require_compiled() -> None:
    if _C is None:
        raise ImportError(
            "rlkernels._C is not built. Install with `pip install --no-build-isolation .` "
            f"(import failed: {_IMPORT_ERROR})")


def build_info() -> dict:
    """What the extension reports about its build (rlkernels' import has required it)."""
    return dict(BUILD_INFO)


def has_compiled(backend: str) -> bool:
    return backend in COMPILED_BACKENDS


def triton_status() -> tuple[bool, str]:
    return TRITON_IMPORTABLE, TRITON_WHY


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
