"""rlkernels.ppo_loss and rlkernels.grpo_loss: the clipped policy-gradient surrogate
in one fused pass (loss, per-token gradient and statistics), on the op
rlkernels::policy_loss."""
from __future__ import annotations

import torch

from .. import _backend, _validate as V, reference
from .._library import _C
from ..reference.policy_loss import GRPO_LOSS_TYPES, KL_ESTIMATORS, POLICY_STATS, grpo_aggregation
from . import _packed, _registry, _token_loss
from ._token_loss import count_or, off_or

__all__ = ["ppo_loss", "grpo_loss"]

_OP = "policy_loss"


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor | None = None, *, clip_low: float = 0.2, clip_high: float | None = None,
             dual_clip: float | None = None, log_ratio_clamp: float | None = 20.0, agg: str = "token-mean",
             num_tokens: float | None = None, num_seqs: float | None = None, norm_length: float | None = None,
             weights: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, max_seqlen: int | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate over `[B, T]` tokens, with its gradient w.r.t. `logprobs`
    (packed `[total]` / `[1, total]` tokens with `cu_seqlens` or `position_ids`: see
    docs/losses.md, "Packed batches"; T is then max_seqlen).

    Per token (A = advantages, `[B, T]` or per sequence `[B]`)::

        ratio = exp(clamp(logprobs - old_logprobs, -log_ratio_clamp, log_ratio_clamp))
        L     = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        L     = min(L, -A * dual_clip)   where A < 0, if dual_clip is given (dual-clip PPO)
        L     = weights * L              if weights (e.g. importance-sampling corrections)

    aggregated over the mask by `agg` (n_t = valid tokens or `num_tokens`, n_s = rows
    with a valid token or `num_seqs`, T_norm = T or `norm_length`): "token-mean"
    sum(L)/n_t, "token-sum", "seq-mean-token-sum" sum(L)/n_s, "seq-mean-token-mean"
    sum_s(mean_t L)/n_s, "seq-mean-token-sum-norm" sum(L)/(n_s T_norm).  Passing the
    global counts makes micro-batches and data-parallel ranks add up to the gradient
    of the whole batch.  NaN or inf in masked slots never reaches the results.

    Returns (loss, stats): loss is a 0-dim float32 tensor (float64 for float64 input);
    stats holds 0-dim tensors averaged over valid tokens: clip_frac_upper (A > 0 and
    ratio > 1 + clip_high), clip_frac_lower (A < 0 and ratio < 1 - clip_low),
    clip_frac_dual (A < 0 and the dual clip binds), approx_kl_k1 (mean of old - new),
    approx_kl_k3 (mean of ratio - 1 - log ratio), ratio_mean, ratio_max, kl (0 here)
    and num_tokens (the valid tokens of this batch).  Only `logprobs` gets a gradient.
    """
    if cu_seqlens is not None or position_ids is not None:
        op = ppo_loss.__name__
        pk = _packed.packing(op, "logprobs", logprobs, cu_seqlens, position_ids, max_seqlen)
        return ppo_loss(pk.pad(op, "logprobs", logprobs), pk.pad(op, "old_logprobs", old_logprobs),
                        _per_row_or_pad(pk, op, "advantages", advantages), pk.mask(op, mask), clip_low=clip_low,
                        clip_high=clip_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, agg=agg,
                        num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length,
                        weights=pk.pad(op, "weights", weights), backend=backend)
    return _policy(ppo_loss.__name__, logprobs, old_logprobs, advantages, mask, weights=weights, ref_logprobs=None,
                   clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp,
                   kl_coef=0.0, kl="none", agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                   norm_length=norm_length, backend=backend)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor | None = None, *, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
              kl: str = "k3", loss_type: str = "grpo", clip_low: float = 0.2, clip_high: float | None = None,
              max_completion_length: int | None = None, num_tokens: float | None = None,
              num_seqs: float | None = None, log_ratio_clamp: float | None = None,
              cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
              max_seqlen: int | None = None, backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """GRPO's loss as TRL's GRPOTrainer computes it, fused like ppo_loss::

        L = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * KL

    with KL the k1/k2/k3 estimator of KL(pi || pi_ref) (k3 = exp(ref - lp) - (ref - lp) - 1,
    TRL's) and `advantages` per sequence `[B]` or per token `[B, T]`.  old_logprobs=None
    means on-policy (ratio 1, TRL's `per_token_logps.detach()`).  Normalisation:
    "grpo" mean over the B rows of the per-row token mean; "bnpo" sum / valid tokens;
    "dr_grpo" sum / (B * max_completion_length, default T); "dapo" sum / num_tokens
    (TRL's num_items_in_batch / num_processes; default the valid tokens).  TRL's
    further division by the gradient accumulation steps is the trainer's business.
    num_seqs overrides B for grpo/dr_grpo.  No log-ratio clamp unless log_ratio_clamp
    is given (TRL has none).  Stats as for ppo_loss, with kl the mean KL estimate.
    Packed tokens take `cu_seqlens` / `position_ids` as ppo_loss does (B is then the
    number of sequences, T max_seqlen).
    """
    op = grpo_loss.__name__
    if cu_seqlens is not None or position_ids is not None:
        pk = _packed.packing(op, "logprobs", logprobs, cu_seqlens, position_ids, max_seqlen)
        return grpo_loss(pk.pad(op, "logprobs", logprobs), pk.pad(op, "old_logprobs", old_logprobs),
                         _per_row_or_pad(pk, op, "advantages", advantages), pk.mask(op, mask),
                         ref_logprobs=pk.pad(op, "ref_logprobs", ref_logprobs), beta=beta, kl=kl,
                         loss_type=loss_type, clip_low=clip_low, clip_high=clip_high,
                         max_completion_length=max_completion_length, num_tokens=num_tokens, num_seqs=num_seqs,
                         log_ratio_clamp=log_ratio_clamp, backend=backend)
    V.choice(op, "loss_type", loss_type, GRPO_LOSS_TYPES)
    V.choice(op, "kl", kl, KL_ESTIMATORS)
    beta = V.number(op, "beta", beta, low=0.0, finite=True)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"{op}: beta > 0 needs ref_logprobs")
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise TypeError(f"{op}: max_completion_length must be an int, got {type(max_completion_length).__name__}")
        if max_completion_length <= 0:
            raise ValueError(f"{op}: max_completion_length must be > 0, got {max_completion_length}")
    # checked even where loss_type does not use them (a bad count is a bug upstream)
    num_tokens = _token_loss.optional_positive(op, "num_tokens", num_tokens)
    num_seqs = _token_loss.optional_positive(op, "num_seqs", num_seqs)
    V.float_tensor(op, "logprobs", logprobs, ndim=2)
    use_kl = beta > 0
    if not use_kl:  # (a used one is checked with the other token tensors)
        _token_loss.unused_companion(op, "ref_logprobs", ref_logprobs, "logprobs", logprobs)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    norm = grpo_aggregation(loss_type, logprobs.shape[0], logprobs.shape[1],
                            max_completion_length=max_completion_length, num_tokens=num_tokens, num_seqs=num_seqs)
    return _policy(op, logprobs, old_logprobs, advantages, mask, weights=None,
                   ref_logprobs=ref_logprobs if use_kl else None, clip_low=clip_low, clip_high=clip_high,
                   dual_clip=None, log_ratio_clamp=log_ratio_clamp, kl_coef=beta, kl=kl if use_kl else "none",
                   backend=backend, agg=norm["agg"], num_tokens=norm.get("num_tokens"),
                   num_seqs=norm.get("num_seqs"), norm_length=norm.get("norm_length"))


def _per_row_or_pad(pk, op: str, name: str, value):
    """A per-sequence tensor ([S] or [S, 1]) passes as it is; a per-token one is padded."""
    if isinstance(value, torch.Tensor) and tuple(value.shape) in ((pk.num_seqs,), (pk.num_seqs, 1)) \
            and tuple(value.shape) != tuple(pk.shape):
        return value
    return pk.pad(op, name, value)


def _policy(op, logprobs, old_logprobs, advantages, mask, *, weights, ref_logprobs, clip_low, clip_high, dual_clip,
            log_ratio_clamp, kl_coef, kl, agg, num_tokens, num_seqs, norm_length, backend):
    # The usual call, checked and run in one compiled call (csrc/usual_calls.cpp); None
    # where any argument is of another kind, which the checks below handle.
    if not torch.compiler.is_compiling():
        done = _C.policy_loss_usual(POLICY_STATS, logprobs, old_logprobs, advantages, mask, weights, ref_logprobs,
                                    clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, kl, agg, num_tokens,
                                    num_seqs, norm_length, backend)
        if done is not None:
            return done
    return _policy_checked(op, logprobs, old_logprobs, advantages, mask, weights=weights, ref_logprobs=ref_logprobs,
                           clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                           log_ratio_clamp=log_ratio_clamp, kl_coef=kl_coef, kl=kl, agg=agg, num_tokens=num_tokens,
                           num_seqs=num_seqs, norm_length=norm_length, backend=backend)


def _policy_checked(op, logprobs, old_logprobs, advantages, mask, *, weights, ref_logprobs, clip_low, clip_high,
                    dual_clip, log_ratio_clamp, kl_coef, kl, agg, num_tokens, num_seqs, norm_length, backend):
    """_policy with its checks in Python, for every kind of argument."""
    clip_low = V.number(op, "clip_low", clip_low, low=0.0, high=1.0, low_open=True, high_open=True)
    clip_high = clip_low if clip_high is None else V.number(op, "clip_high", clip_high, low=0.0, low_open=True)
    if dual_clip is not None:
        dual_clip = V.number(op, "dual_clip", dual_clip, low=1.0, low_open=True)
    log_ratio_clamp = _token_loss.optional_positive(op, "log_ratio_clamp", log_ratio_clamp, finite=False)
    if log_ratio_clamp is not None and V.is_inf(log_ratio_clamp):
        log_ratio_clamp = None
    num_tokens, num_seqs, norm_length = _token_loss.normalisers(op, agg, num_tokens, num_seqs, norm_length)
    (logprobs, old_logprobs, advantages, weights, ref_logprobs), mask, device = _token_loss.token_tensors(
        op, "logprobs", logprobs,
        {"old_logprobs": old_logprobs, "advantages": advantages, "weights": weights, "ref_logprobs": ref_logprobs},
        mask, per_row=("advantages",), required=("old_logprobs", "advantages"))
    chosen = _backend.resolve(op, backend, device)
    if chosen == "reference":
        return reference.ppo_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                  dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, agg=agg,
                                  num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length,
                                  weights=weights, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                                  kl=kl if kl != "none" else "k3")
    fn = _registry.kernel(_OP, chosen)
    coefficients = [clip_low, clip_high, off_or(dual_clip), off_or(log_ratio_clamp), float(kl_coef),
                    count_or(num_tokens), count_or(num_seqs), count_or(norm_length)]
    loss, stats, _, _ = fn(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients, kl, agg,
                           _token_loss.need_grad(logprobs))
    return loss, _token_loss.stats_dict(POLICY_STATS, stats)


def _policy_loss_fake(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients, kl, agg,
                      need_grad):
    return _token_loss.fake_outputs(logprobs, len(POLICY_STATS), need_grad)


_token_loss.register(_OP, _policy_loss_fake, 10, public_name="ppo_loss/grpo_loss")
