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

from .ops import (  # noqa: E402
    discounted_returns, dpo_loss, gae, gossip_mix, group_advantages, grpo_loss, kl_from_logits, kl_penalty,
    linear_logprobs, linear_ppo_loss, logprobs, masked_mean, masked_whiten, pack_tensors, ppo_loss, sequence_logprobs,
    unpack_tensors, value_loss,
)
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


__all__ = [
    "BACKENDS", "info", "distributed",
    # advantages
    "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
    # log-probs, entropy, KL
    "logprobs", "linear_logprobs", "kl_from_logits", "kl_penalty",
    # losses
    "ppo_loss", "grpo_loss", "value_loss", "dpo_loss", "sequence_logprobs", "linear_ppo_loss",
    # multi-tensor kernels behind rlkernels.distributed
    "pack_tensors", "unpack_tensors", "gossip_mix",
]
