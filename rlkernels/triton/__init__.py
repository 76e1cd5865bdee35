"""Triton kernels, each registered as its own op (rlkernels::<op>_triton).
Imported by rlkernels when triton is importable; on CPU tensors they run under
TRITON_INTERPRET=1 (how CI checks them)."""
from . import gae  # noqa: F401
from . import group  # noqa: F401
from . import logprobs  # noqa: F401
from . import kl_penalty  # noqa: F401
from . import losses  # noqa: F401
from . import preference  # noqa: F401
from . import multi_tensor  # noqa: F401
