"""The one indirection point between trainers and kernels.

A trainer gets a `Kernels` object at start and calls every hot computation through it
(`ops.logprobs(...)`, `ops.gae(...)`, `ops.ppo_loss(...)`).  `Kernels("rlkernels")`
hands out the public rlkernels ops (backend "auto": the compiled or Triton kernel for
the tensors' device); `Kernels("reference")` hands out the same public functions pinned
to `backend="reference"`, i.e. the pure-PyTorch definitions in `rlkernels.reference`,
so the trainer code, its validation and its arguments are identical and only the
kernels differ."""
from __future__ import annotations

import functools
import inspect

KERNEL_SETS = ("rlkernels", "reference")


class Kernels:
    """Namespace of the ops a trainer calls; attributes resolve on first use, so a
    trainer that needs an op this build lacks fails with a message naming it."""

    def __init__(self, name: str = "rlkernels"):
        if name not in KERNEL_SETS:
            raise ValueError(f"kernels must be one of {KERNEL_SETS}, got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Kernels({self.name!r})"

    def has(self, op: str) -> bool:
        """Whether this build provides `op` (for optional fast paths)."""
        try:
            getattr(self, op)
        except AttributeError:
            return False
        return True

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        import rlkernels

        fn = getattr(rlkernels, op, None)
        if fn is None:
            raise AttributeError(f"rlkernels has no op {op!r} in this build (needed by the trainer)")
        if self.name == "reference":
            fn = _pin_reference(op, fn)
        setattr(self, op, fn)  # later lookups skip __getattr__
        return fn


def _pin_reference(op: str, fn):
    try:
        takes_backend = "backend" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        takes_backend = False
    if takes_backend:
        return functools.partial(fn, backend="reference")
    from rlkernels import reference

    ref = getattr(reference, op, None)
    if ref is None:
        raise AttributeError(f"rlkernels.{op} has neither a backend argument nor a reference version")
    return ref
