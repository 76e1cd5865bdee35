"""Where each rlkernels op is defined once.

The schema of every op is the compiled one (csrc/registration.cpp).  Everything
else is derived from it here:

- `triton_twin(name)` defines `rlkernels::<name>_triton` with the compiled op's
  schema under the new name (defaults and mutation annotations included) and
  registers the Triton host function for the CPU (TRITON_INTERPRET=1) and CUDA
  dispatch keys;
- `register(name, fake=..., backward=..., setup_context=...)` is the one call per
  op that gives the compiled op and its Triton twin the same fake kernel, whichever
  of the two is defined first, and the twin its Python autograd;
- `kernel(name, backend)` is the torch op a backend runs.

The compiled op's autograd is C++ (csrc/autograd/<family>.cpp, the op's Autograd
dispatch key): a Python autograd wrapper costs ~20-50 us a call.  `register` checks
that it is there for every op given a `backward`, whose Python form then serves the
Triton twin, with `ctx.backend` = "triton" (so a backward calls
`kernel("<name>_backward", ctx.backend)`).  docs/adding-an-op.md says where each
piece of a backward lives.

Why not `torch.library.triton_op` + `wrap_triton` (evaluated on torch 2.13): under
TRITON_INTERPRET=1, torch.compile traces a triton_op by running its body on fake
tensors, and the interpreter dereferences real data pointers, so compiling any
Triton op on CPU tensors fails ("Cannot access data pointer of Tensor") -- and CI
checks the Triton kernels on CPU under the interpreter.  triton_op would also infer
a second copy of each schema from a Python signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NAMESPACE = "rlkernels"
TWIN_SUFFIX = "_triton"

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


@dataclass(frozen=True)
class _Spec:
    fake: Callable
    backward: Callable | None
    setup_context: Callable | None


_SPECS: dict[str, _Spec] = {}
# Triton twin name ("<op>_triton") -> its host function, for tools that call the
# host code directly (.ci/triton_aot.py) and for the conformance test.
TWINS: dict[str, Callable] = {}


def twin_name(name: str) -> str:
    return name + TWIN_SUFFIX


_KERNELS: dict[tuple[str, str], object] = {}


def kernel(name: str, backend: str):
    """The torch op that `backend` runs for the op `name`: its Triton twin for
    "triton", otherwise the compiled op (whose dispatch keys hold CPU and CUDA).
    Held once found: the lookup through torch.ops costs more than a dictionary's."""
    key = (name, backend)
    found = _KERNELS.get(key)
    if found is None:
        found = _KERNELS[key] = getattr(torch.ops.rlkernels, twin_name(name) if backend == "triton" else name)
    return found


def compiled_schema(name: str) -> torch.FunctionSchema:
    return getattr(torch.ops.rlkernels, name).default._schema


def triton_twin(name: str):
    """Decorator: defines `rlkernels::<name>_triton` from the compiled op's schema with
    the decorated function as its CPU and CUDA kernel; returns the function unchanged."""

    def define(fn: Callable) -> Callable:
        schema = compiled_schema(name)
        assert not schema.overload_name, f"{name}: overloads are not derived"
        qualified = f"{NAMESPACE}::{name}"
        text = str(schema)
        assert text.startswith(qualified + "("), text
        twin = twin_name(name)
        _LIB.define(twin + text[len(qualified):])
        for key in ("CPU", "CUDA"):
            _LIB.impl(twin, fn, key)
        TWINS[twin] = fn
        if name in _SPECS:
            _apply(name, twin, "triton")
        return fn

    return define


def register(name: str, *, fake: Callable, backward: Callable | None = None,
             setup_context: Callable | None = None) -> None:
    """The fake kernel and (optionally) the autograd of the op `name`, for the compiled
    op and its Triton twin alike."""
    assert name not in _SPECS, f"{name} is registered twice"
    _SPECS[name] = _Spec(fake, backward, setup_context)
    _apply(name, name, "compiled")
    if twin_name(name) in TWINS:
        _apply(name, twin_name(name), "triton")


def registered() -> tuple[str, ...]:
    """The ops given a fake kernel here (compiled names)."""
    return tuple(_SPECS)


def _apply(name: str, target: str, backend: str) -> None:
    spec = _SPECS[name]
    qualified = f"{NAMESPACE}::{target}"
    torch.library.register_fake(qualified)(spec.fake)
    if spec.backward is None:
        return
    if backend == "compiled":
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Autograd"):
            raise RuntimeError(f"{qualified} has a backward but no C++ autograd kernel "
                               f"(TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) in csrc/autograd/): "
                               "rebuild the extension")
        return
    setup = spec.setup_context

    def setup_context(ctx, inputs, output):
        ctx.backend = backend
        if setup is not None:
            setup(ctx, inputs, output)

    torch.library.register_autograd(qualified, spec.backward, setup_context=setup_context)
