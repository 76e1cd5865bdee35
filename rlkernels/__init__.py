"""rlkernels: fast, memory-lean kernels for RL fine-tuning of language models.

Every op is one function with backend="auto" | "cpu" | "cuda" | "triton" |
"reference"; see `rlkernels.info()` for what this build provides."""
from __future__ import annotations

from . import _library

_library.require_compiled()
from ._backend import BACKENDS
from ._checkmode import checked, checks_enabled, set_checks  # noqa: E402  (the checked mode)

HAS_TRITON, _TRITON_WHY = _library.triton_status()
if HAS_TRITON:
    from . import triton as _triton_ops  # noqa: F401  (registers rlkernels::*_triton)

from . import ops  # noqa: E402
from .ops import *  # noqa: E402,F401,F403  (the public ops, as listed in ops.__all__)
from . import distributed  # noqa: E402,F401  (rlkernels.distributed: averaging over torch.distributed)

__version__ = "0.1.0"


def info() -> dict:
    """Build and runtime facts: compiled backends, CUDA archs, threads, Triton."""
    import torch

    data = dict(_library.build_info())
    data["triton"] = HAS_TRITON
    if HAS_TRITON:
        import triton

        data["triton_version"] = triton.__version__
    else:
        data["triton_unavailable"] = _TRITON_WHY
    data["triton_interpret"] = _library.triton_interpreting()
    data["torch"] = torch.__version__
    data["torch_cuda"] = torch.version.cuda
    data["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    data["version"] = __version__
    return data


# The public ops are those of rlkernels.ops; the rest is build information and the
# averaging module.  The checked mode's switches (checked, checks_enabled,
# set_checks) are attributes of the package, left out of __all__ with the ops'
# helpers, since the tests read __all__ as the list of ops.
__all__ = ["BACKENDS", "info", "distributed", *ops.__all__]
