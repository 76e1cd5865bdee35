"""rlkernels.value_loss: the (clipped) value-function loss in one fused pass, on the
op rlkernels::value_loss."""
from __future__ import annotations

import torch

from .. import _backend, _validate as V, reference
from ..reference.value_loss import VALUE_STATS
from . import _packed, _registry, _token_loss

__all__ = ["value_loss"]

_OP = "value_loss"


def value_loss(values: torch.Tensor, old_values: torch.Tensor | None, returns: torch.Tensor,
               mask: torch.Tensor | None = None, *, clip: float | None = None, agg: str = "token-mean",
               num_tokens: float | None = None, num_seqs: float | None = None, norm_length: float | None = None,
               cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
               max_seqlen: int | None = None, backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """PPO's value loss over `[B, T]` tokens, or packed `[total]` / `[1, total]` ones with
    `cu_seqlens` / `position_ids` (as ppo_loss), with its gradient w.r.t. `values`::

        L = 0.5 * max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2)   (clip given)
        L = 0.5 * (v - R)^2                                                   (clip=None)

    aggregated by `agg` exactly as ppo_loss (same modes, same num_tokens / num_seqs /
    norm_length).  old_values may be None when clip is None.  NaN or inf in masked
    slots never reaches the results.  Returns (loss, stats) with stats clip_frac (the
    fraction of valid tokens where the clipped term is strictly larger, verl's
    vf_clipfrac) and num_tokens.  float32 loss (float64 for float64 input).
    """
    op = value_loss.__name__
    if cu_seqlens is not None or position_ids is not None:
        pk = _packed.packing(op, "values", values, cu_seqlens, position_ids, max_seqlen)
        return value_loss(pk.pad(op, "values", values), pk.pad(op, "old_values", old_values),
                          pk.pad(op, "returns", returns), pk.mask(op, mask), clip=clip, agg=agg,
                          num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length, backend=backend)
    if clip is not None:
        clip = V.number(op, "clip", clip, low=0.0, low_open=True)
    elif old_values is None:
        old_values = values
    if old_values is None:
        raise ValueError(f"{op}: old_values is needed when clip is given")
    num_tokens, num_seqs, norm_length = _token_loss.normalisers(op, agg, num_tokens, num_seqs, norm_length)
    (values, old_values, returns), mask, device = _token_loss.token_tensors(
        op, "values", values, {"old_values": old_values, "returns": returns}, mask, required=("returns",))
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.value_loss(values, old_values, returns, mask, clip=clip, agg=agg, num_tokens=num_tokens,
                                    num_seqs=num_seqs, norm_length=norm_length)
    fn = _registry.kernel(_OP, chosen)
    coefficients = [_token_loss.off_or(clip), _token_loss.count_or(num_tokens), _token_loss.count_or(num_seqs),
                    _token_loss.count_or(norm_length)]
    loss, stats, _, _ = fn(values, old_values, returns, mask, coefficients, agg, _token_loss.need_grad(values))
    return loss, _token_loss.stats_dict(VALUE_STATS, stats)


def _value_loss_fake(values, old_values, returns, mask, coefficients, agg, need_grad):
    return _token_loss.fake_outputs(values, len(VALUE_STATS), need_grad)


_token_loss.register(_OP, _value_loss_fake, 7, public_name="value_loss")
