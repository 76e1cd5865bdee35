"""patch_trl(): TRL's log-prob and entropy functions on the rlkernels kernels.

Replaced (in `trl.trainer.utils` and in every loaded `trl` module that imported them by
name; modules imported later pick the replacement up from `trl.trainer.utils`):

- `selective_log_softmax(logits, index, temperature=1.0, row_mask=None)` ->
  `rlkernels.logprobs` (one streaming pass, fused backward, no [N, V] temporary).
- `entropy_from_logits(logits, chunk_size=128)` -> `rlkernels.logprobs(..., entropy=True)`.
- `selective_log_softmax_and_entropy(...)` -> both from the same pass.
- `_ChunkedLogProbFunction` (the fused LM head the GRPO, RLOO, DPO, KTO and SFT
  trainers install with `add_fused_lm_head`) -> `rlkernels.linear_logprobs` for
  log-probs, entropy, `mean_logits` and `is_top1`, all from one call, so a policy
  that asks for the extras (DPO) and its reference that does not run the same kernel.

Each replacement keeps TRL's signature and output dtype and falls back to TRL's own
function for what it does not cover (top-k index tensors, logit soft-capping or
scaling, the `log_sum_sq_probs` output of WPO, mixed dtypes or autocast)."""
from __future__ import annotations

import torch

from ._patching import FunctionPatch

_PATCH = FunctionPatch("trl")
_original = _PATCH.original
_LOWP = (torch.float16, torch.bfloat16)


def _as_input_dtype(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # TRL returns low-precision log-probs for low-precision logits; ours are float32
    return values.to(logits.dtype) if logits.dtype in _LOWP else values


def _covered(logits: torch.Tensor, index: torch.Tensor | None = None) -> bool:
    if logits.dtype not in (torch.float32,) + _LOWP or logits.dim() < 1 or logits.shape[-1] == 0:
        return False
    return index is None or (index.dim() == logits.dim() - 1 and index.shape == logits.shape[:-1])


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    import rlkernels

    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if not _covered(logits, index):
        return _original("selective_log_softmax")(logits, index, temperature, row_mask)
    out = _as_input_dtype(rlkernels.logprobs(logits, index, temperature=temperature), logits)
    return out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    import rlkernels

    if not _covered(logits):
        return _original("entropy_from_logits")(logits, chunk_size)
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = rlkernels.logprobs(logits, labels, entropy=True)
    return _as_input_dtype(entropy, logits)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: torch.Tensor | None = None):
    import rlkernels

    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if not _covered(logits, index):
        return _original("selective_log_softmax_and_entropy")(logits, index, entropy_requires_grad, temperature,
                                                               row_mask)
    logprobs, entropy = rlkernels.logprobs(logits, index, temperature=temperature, entropy=True)
    logprobs, entropy = _as_input_dtype(logprobs, logits), _as_input_dtype(entropy, logits)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return logprobs, entropy


# The fused head's per-token outputs rlkernels.linear_logprobs computes; TRL's own
# function answers for the rest (log_sum_sq_probs).
_FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


class ChunkedLogProbFunction:
    """Stands in for TRL's `_ChunkedLogProbFunction` (same `.apply` arguments and
    5-tuple result: log-probs, entropy, log_sum_sq_probs, mean_logits, is_top1, each
    None when not asked for).  mean_logits and is_top1 follow TRL's definitions (the
    mean of the temperature-scaled logits over the vocabulary; the label is the
    arg-max, the first of equal maxima winning), computed on the float32 logits: TRL
    compares logits after dividing by the temperature, where rounding can make two
    nearly equal logits tie, and in 16-bit under autocast."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        import rlkernels

        covered = (all(name in _FUSED_OUTPUTS for name in outputs) and final_logit_softcapping is None
                   and logit_scale == 1.0
                   and hidden.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
                   and hidden.dtype in (torch.float32,) + _LOWP
                   and not torch.is_autocast_enabled(hidden.device.type))
        if not covered:
            return _original("_ChunkedLogProbFunction").apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                              final_logit_softcapping, logit_scale, outputs)
        wanted = {name: name in outputs for name in ("entropy", "mean_logits", "is_top1")}
        out = rlkernels.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, **wanted)
        values = iter(out if isinstance(out, tuple) else (out,))
        logprobs = next(values)
        entropy, mean_logits, is_top1 = (next(values) if wanted[name] else None for name in wanted)
        return logprobs, entropy, None, mean_logits, is_top1


_REPLACEMENTS = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    "_ChunkedLogProbFunction": ChunkedLogProbFunction,
}


def patch_trl(*, fused_lm_head: bool = True) -> list[str]:
    """Points TRL's log-prob/entropy functions at rlkernels; returns the patched
    `module.attribute` names.  Idempotent; `unpatch_trl()` restores TRL's own."""
    try:
        import trl.trainer.utils as utils
    except ImportError as exc:
        raise ImportError(f"patch_trl needs trl (pip install trl): {exc}") from exc
    names = [n for n in _REPLACEMENTS if hasattr(utils, n) and (fused_lm_head or n != "_ChunkedLogProbFunction")]
    return _PATCH.apply({n: getattr(utils, n) for n in names}, _REPLACEMENTS)


def unpatch_trl() -> None:
    """Restores every attribute patch_trl replaced."""
    _PATCH.restore()
