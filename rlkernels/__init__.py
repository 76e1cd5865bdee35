"""rlkernels: fast, memory-lean kernels for RL fine-tuning of language models.

Every op is one function with backend="auto" | "cpu" | "cuda" | "triton" |
"reference"; see `rlkernels.info()` for what this build provides."""
from __future__ import annotations

from . import _library

_library.require_compiled()
from ._backend import BACKENDS

HAS_TRITON, _TRITON_WHY = _library.triton_status()
if HAS_TRITON:
    from . import triton as _triton_ops  # noqa: F401  (registers rlkernels::*_triton)

from .ops import discounted_returns, gae, group_advantages, masked_mean, masked_whiten  # noqa: E402
from .ops import dpo_loss, grpo_loss, ppo_loss, sequence_logprobs, value_loss  # noqa: E402
from .ops import kl_from_logits, kl_penalty, linear_logprobs, logprobs  # noqa: E402
from .ops import linear_ppo_loss  # noqa: E402

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


__all__ = ["BACKENDS", "info", "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten"]
__all__ += ["ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs"]
__all__ += ["logprobs", "kl_from_logits", "kl_penalty", "linear_logprobs"]
__all__ += ["linear_ppo_loss"]
