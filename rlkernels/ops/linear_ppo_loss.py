"""rlkernels.linear_ppo_loss: from the last hidden states and the lm-head straight to
the PPO/GRPO loss, in one sweep over token pieces that never holds the [N, V]
logits and computes the gradients on the way.

This module is the front end (argument checks naming the argument, the reference
path, the fake kernel); the sweep is the C++ op rlkernels::linear_policy_loss
(csrc/lm_head/linear_policy_loss.cpp, one device-generic body over ATen ops and the
dispatcher) with its autograd in C++ (csrc/autograd/linear_policy_loss.cpp).  For each
piece: logits = hidden @ weight.T (+ bias) into one reused buffer, on the row blocks of
csrc/lm_head/tiles.h (linear_logprobs' too: the log-probs are its bits); the fused log-softmax
row kernel (rlkernels::logprobs) gives log-probs, entropies and softmax statistics; the
fused policy op (rlkernels::policy_loss) gives the piece's share of the loss, its
statistics and d loss / d log-prob (the aggregation only needs the batch's token and
sequence counts: read from the mask up front, or kept on the device on CUDA,
_ppo_pieces.py); the row kernel's in-place backward turns the logits into d loss /
d logits, and two matmuls add the piece's gradients for hidden and weight.  Three
matmuls in all, as many as the composed forward and backward; backward only scales the
stored gradients by the incoming one.  Pieces are whole rows when a row fits the
budget, else segments of one row (the loss's per-row normalisers stay exact)."""
from __future__ import annotations

import torch
from torch.library import register_fake

from .. import _validate as V
from .._library import _C
from ..reference._token_loss import aggregate
from ..reference.policy_loss import KL_ESTIMATORS, POLICY_STATS
from . import _ppo_pieces, _token_loss
from . import _logits as L
from .policy_loss import _policy

__all__ = ["linear_ppo_loss"]

_OP = "linear_ppo_loss"
STATS = POLICY_STATS + ("entropy",)
# Below this many multiply-adds of the lm-head (B * T * V * H), masked tokens go through
# it: dropping them costs a gather, two scatters and a host read (tens of microseconds).
_EVERY_TOKEN_MACS = 1 << 20


def linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor | None = None, *,
                    ref_logprobs: torch.Tensor | None = None, beta: float = 0.0, kl: str = "k3",
                    entropy_coef: float = 0.0, temperature: float = 1.0, bias: torch.Tensor | None = None,
                    clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                    log_ratio_clamp: float | None = 20.0, agg: str = "token-mean", num_tokens: float | None = None,
                    num_seqs: float | None = None, norm_length: float | None = None,
                    weights: torch.Tensor | None = None, ignore_index: int = -100, chunk_size: int | None = None,
                    group=None, exact: bool = False, backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """The loss of ppo_loss (all its options) on logprobs = log softmax((hidden @ weight.T
    + bias) / temperature)[labels], plus ``beta * KL(pi || pi_ref)`` per token (k1/k2/k3 as
    in grpo_loss, needs ref_logprobs) minus ``entropy_coef * agg(entropy)`` (the entropy
    bonus aggregated with the same `agg` and normalisers)::

        loss = agg(weights * L_clip + beta * KL) - entropy_coef * agg(entropy)

    hidden `[B, T, H]`, weight `[V, H]` (the lm-head; float32, bfloat16 or float16 like
    hidden, float64 runs on the reference), labels `[B, T]` (the sampled tokens),
    old_logprobs / advantages / mask / ref_logprobs / weights as in ppo_loss.  Masked
    tokens and labels equal to ignore_index take no part (and skip the lm-head).  At
    most `chunk_size` tokens of logits exist at a time (default: 64 MiB of float32).
    Gradients flow to hidden, weight and bias; they are computed in the forward sweep
    (no recomputation), so the forward holds grad-sized buffers for them.  Returns
    (loss, stats): ppo_loss's stats plus "entropy" (mean over valid tokens, 0 unless
    entropy_coef is non-zero).  On CUDA the call reads no data on the host (outside the
    checked mode, rlkernels.set_checks): the batch's counts stay on the device, masked
    tokens go through the lm-head (with no gradient), and backward scales the stored
    gradients out of place (a second weight-sized buffer).  On the CPU, and in the checked
    mode, the counts are read once per call, masked tokens skip the lm-head, and a
    backward with gradient 1 hands the stored gradients over as they are.
    group: a torch.distributed process group over which the vocabulary is sharded
    (tensor parallel): weight (and bias) are this rank's contiguous shard, shards in rank
    order, labels global ids; every rank gets the full-vocabulary result (docs/distributed.md,
    rlkernels.distributed.vocab_parallel for the keywords that tune it); exact=True there
    gives the unsharded CPU op's log-probs bit for bit (CPU, shards on chunk edges).
    """
    if group is None and not torch.compiler.is_compiling():
        # The usual call, checked and run in one compiled call (csrc/usual_calls.cpp); None
        # where any argument is of another kind, which the checks below handle.
        done = _C.linear_ppo_loss_usual(
            STATS, _EVERY_TOKEN_MACS, hidden, weight, labels, old_logprobs, advantages, mask, ref_logprobs, beta, kl,
            entropy_coef, temperature, bias, clip_low, clip_high, dual_clip, log_ratio_clamp, agg, num_tokens,
            num_seqs, norm_length, weights, ignore_index, chunk_size, exact, backend)
        if done is not None:
            return done
    return _checked(hidden, weight, labels, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, beta=beta,
                    kl=kl, entropy_coef=entropy_coef, temperature=temperature, bias=bias, clip_low=clip_low,
                    clip_high=clip_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, agg=agg,
                    num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length, weights=weights,
                    ignore_index=ignore_index, chunk_size=chunk_size, group=group, exact=exact, backend=backend)


def _checked(hidden, weight, labels, old_logprobs, advantages, mask, *, ref_logprobs, beta, kl, entropy_coef,
             temperature, bias, clip_low, clip_high, dual_clip, log_ratio_clamp, agg, num_tokens, num_seqs,
             norm_length, weights, ignore_index, chunk_size, group, exact, backend):
    """linear_ppo_loss with its checks in Python, for every kind of argument."""
    if group is not None:
        if chunk_size is not None:
            raise ValueError("linear_ppo_loss: chunk_size is not supported with group= (vocabulary-parallel)")
        from ..distributed import vocab_parallel

        return vocab_parallel.linear_ppo_loss(
            hidden, weight, labels, old_logprobs, advantages, mask, group=group, ref_logprobs=ref_logprobs, beta=beta,
            kl=kl, entropy_coef=entropy_coef, temperature=temperature, bias=bias, ignore_index=ignore_index,
            exact=exact, backend=backend, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            log_ratio_clamp=log_ratio_clamp, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
            norm_length=norm_length, weights=weights)
    op = _OP
    device = L.lm_head(op, hidden, weight, bias, hidden_ndim=3)
    beta = V.number(op, "beta", beta, low=0.0, finite=True)
    entropy_coef = V.number(op, "entropy_coef", entropy_coef, finite=True)
    V.choice(op, "kl", kl, KL_ESTIMATORS)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"{op}: beta > 0 needs ref_logprobs")
    V.tensor(op, "labels", labels, ndim=2)
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{op}: labels must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels is on {labels.device} but hidden is on {device}")
    ignore_index = L.index(op, "ignore_index", ignore_index)
    temperature = L.temperature(op, temperature)
    valid = V.binary_mask(op, "mask", mask, labels.shape, device)
    if valid is not None:
        # Masked tokens need no logits: give them the ignored label.
        labels = torch.where(valid, labels, ignore_index)
    chosen = L.choose_backend(op, backend, device, hidden.dtype)
    # The CPU row kernel checks the label range in its own pass (csrc/cpu/logprobs.cpp) and
    # sees every label that is not ignore_index: its error becomes label_range's below.
    labels = L.labels_for(op, labels, hidden, ignore_index, vocab=weight.shape[0], logits_name="hidden",
                          check_range=chosen != "cpu")
    _token_loss.unused_companion(op, "ref_logprobs", ref_logprobs, "labels", labels)
    valid = labels != ignore_index
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if chosen == "reference":
        return _composed(hidden, weight, labels, old_logprobs, advantages, valid, ref_logprobs=ref_logprobs,
                         beta=beta, kl=kl, entropy_coef=entropy_coef, temperature=temperature, bias=bias,
                         clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                         log_ratio_clamp=log_ratio_clamp, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                         norm_length=norm_length, weights=weights, ignore_index=ignore_index)
    # Validate and promote the token tensors the way ppo_loss does, and the scalars into the
    # policy op's coefficients.
    clip_low = V.number(op, "clip_low", clip_low, low=0.0, high=1.0, low_open=True, high_open=True)
    clip_high = clip_low if clip_high is None else V.number(op, "clip_high", clip_high, low=0.0, low_open=True)
    if dual_clip is not None:
        dual_clip = V.number(op, "dual_clip", dual_clip, low=1.0, low_open=True)
    log_ratio_clamp = _token_loss.optional_positive(op, "log_ratio_clamp", log_ratio_clamp, finite=False)
    num_tokens, num_seqs, norm_length = _token_loss.normalisers(op, agg, num_tokens, num_seqs, norm_length)
    # (old_logprobs leads: the log-probs themselves are float32, or float64 with a float64
    # token tensor, so the promoted dtype only tells float64 from the rest)
    V.float_tensor(op, "old_logprobs", old_logprobs, ndim=2)
    if old_logprobs.shape != labels.shape:
        raise ValueError(f"{op}: old_logprobs must have the shape of labels {tuple(labels.shape)}, "
                         f"got {tuple(old_logprobs.shape)}")
    if old_logprobs.device != device:
        raise ValueError(f"{op}: old_logprobs is on {old_logprobs.device} but hidden is on {device}")
    (old_logprobs, advantages, weights, ref_logprobs), _, _ = _token_loss.token_tensors(
        op, "old_logprobs", old_logprobs,
        {"advantages": advantages, "weights": weights, "ref_logprobs": ref_logprobs if beta > 0 else None},
        None, per_row=("advantages",), required=("advantages",))
    token_dtype = torch.float32 if old_logprobs.dtype != torch.float64 else torch.float64
    old_logprobs, advantages, weights, ref_logprobs = (
        None if t is None else V.as_dtype(t, token_dtype) for t in (old_logprobs, advantages, weights, ref_logprobs))
    coefficients = [clip_low, clip_high, _token_loss.off_or(dual_clip), _token_loss.off_or(log_ratio_clamp), beta,
                    _token_loss.count_or(num_tokens), _token_loss.count_or(num_seqs), _token_loss.count_or(norm_length)]
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    B, T, H = hidden.shape
    vocab = weight.shape[0]
    # the op balances chunk_size (0: from the budget) by the tile rule (csrc/core/lm_head.h):
    # a compiled call that torch.compile need not trace
    chunk = chunk_size or 0
    pieces = _ppo_pieces.mode(valid, B * T * vocab * H <= _EVERY_TOKEN_MACS)
    try:
        loss, stats, _, _, _ = _SWEEP(
            hidden.contiguous(), weight.contiguous(), labels, bias, old_logprobs, advantages, valid, weights,
            ref_logprobs, coefficients, kl if beta > 0 else "none", agg, entropy_coef, temperature, ignore_index,
            chunk, chosen, needs, pieces)
    except RuntimeError:
        if chosen == "cpu":  # the row kernel's label check: raise the public ValueError instead
            L.label_range(op, labels, weight.shape[0], ignore_index)
        raise
    return loss, _token_loss.stats_dict(STATS, stats)


def _composed(hidden, weight, labels, old_logprobs, advantages, valid, *, ref_logprobs, beta, kl, entropy_coef,
              temperature, bias, clip_low, clip_high, dual_clip, log_ratio_clamp, agg, num_tokens, num_seqs,
              norm_length, weights, ignore_index):
    """The reference path: linear_logprobs then ppo_loss, composed."""
    from .linear_logprobs import linear_logprobs

    with_entropy = entropy_coef != 0.0
    out = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
                          entropy=with_entropy, backend="reference")
    logprobs, entropy = out if with_entropy else (out, None)
    return loss_from_logprobs(linear_ppo_loss.__name__, logprobs, entropy, old_logprobs, advantages, valid,
                              ref_logprobs=ref_logprobs, beta=beta, kl=kl, entropy_coef=entropy_coef,
                              backend="reference", weights=weights, clip_low=clip_low, clip_high=clip_high,
                              dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, agg=agg, num_tokens=num_tokens,
                              num_seqs=num_seqs, norm_length=norm_length)


def loss_from_logprobs(op, logprobs, entropy, old_logprobs, advantages, valid, *, ref_logprobs, beta, kl,
                       entropy_coef, backend, agg, num_tokens, num_seqs, norm_length, **policy_options):
    """The composed loss once the log-probs (and, with entropy_coef, the entropy) exist:
    the policy loss with its KL term, minus the aggregated entropy bonus; stats gain
    "entropy".  The reference path and the vocabulary-parallel one share it."""
    loss, stats = _policy(op, logprobs, old_logprobs, advantages, valid,
                          ref_logprobs=ref_logprobs if beta > 0 else None, kl_coef=beta,
                          kl=kl if beta > 0 else "none", agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                          norm_length=norm_length, backend=backend, **policy_options)
    entropy_mean = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if entropy_coef != 0.0:
        entropy = torch.where(valid, entropy.to(loss.dtype), 0)
        loss = loss - entropy_coef * aggregate(entropy, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                               norm_length=norm_length)
        count = valid.sum()
        entropy_mean = torch.where(count > 0, entropy.detach().sum() / count.clamp(min=1), 0)
    stats["entropy"] = entropy_mean
    return loss, stats


# ---- the op: one sweep over pieces, gradients included (C++) ---------------------------------

_SWEEP = torch.ops.rlkernels.linear_policy_loss.default


@register_fake("rlkernels::linear_policy_loss")
def _linear_policy_loss_fake(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs,
                             coefficients, kl, agg, entropy_coef, temperature, ignore_index, chunk, backend, needs,
                             pieces):
    acc = old_logprobs.dtype
    needs_bias = needs[2] and bias is not None
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((len(STATS),), dtype=acc),
            hidden.new_empty(hidden.shape if needs[0] else (0,)), weight.new_empty(weight.shape if needs[1] else (0,)),
            weight.new_empty(bias.shape if needs_bias else (0,)))
