"""rlkernels.linear_ppo_loss: from the last hidden states and the lm-head straight to
the PPO/GRPO loss, in one sweep over token chunks that never holds the [N, V]
logits and computes the gradients on the way.

For each chunk: logits = hidden @ weight.T (+ bias) into one reused buffer; the
fused log-softmax row kernel (rlkernels::logprobs) gives log-probs, entropies and
softmax statistics; the fused policy op (rlkernels::policy_loss) gives the chunk's
share of the loss, its statistics and d loss / d log-prob (the aggregation only
needs the batch's token and sequence counts: read from the mask up front, or kept on
the device on CUDA, _ppo_pieces.py); the
row kernel's in-place backward turns the logits into d loss / d logits, and two
matmuls add the chunk's gradients for hidden and weight.  Three matmuls in all,
as many as the composed forward and backward; backward only scales the stored
gradients by the incoming one.  Chunks are whole rows when a row fits the
budget, else segments of one row (the loss's per-row normalisers stay exact)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op, register_fake

from .. import _validate as V
from .. import _checkmode
from ..reference._token_loss import aggregate
from ..reference.policy_loss import KL_ESTIMATORS, POLICY_STATS
from . import _chunked, _double_backward, _ppo_pieces, _registry, _token_loss
from . import _logits as L
from .policy_loss import _policy

__all__ = ["linear_ppo_loss"]

_OP = "linear_ppo_loss"
STATS = POLICY_STATS + ("entropy",)


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
    op = linear_ppo_loss.__name__
    L.lm_head(op, hidden, weight, bias, hidden_ndim=3)
    beta = V.number(op, "beta", beta, low=0.0, finite=True)
    entropy_coef = V.number(op, "entropy_coef", entropy_coef, finite=True)
    V.choice(op, "kl", kl, KL_ESTIMATORS)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"{op}: beta > 0 needs ref_logprobs")
    V.tensor(op, "labels", labels, ndim=2)
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{op}: labels must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    device = V.same_device(op, hidden=hidden, weight=weight, bias=bias, labels=labels)
    ignore_index = L.index(op, "ignore_index", ignore_index)
    temperature = L.temperature(op, temperature)
    valid = V.binary_mask(op, "mask", mask, labels.shape, device)
    if valid is not None:
        # Masked tokens need no logits: give them the ignored label.
        labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    labels = L.labels_for(op, labels, hidden, ignore_index, vocab=weight.shape[0], logits_name="hidden")
    _token_loss.unused_companion(op, "ref_logprobs", ref_logprobs, "labels", labels)
    valid = labels != ignore_index
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be an int >= 1, got {chunk_size!r}")
    chosen = L.choose_backend(op, backend, device, hidden.dtype)
    if chosen == "reference":
        return _composed(hidden, weight, labels, old_logprobs, advantages, valid, ref_logprobs=ref_logprobs,
                         beta=beta, kl=kl, entropy_coef=entropy_coef, temperature=temperature, bias=bias,
                         clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                         log_ratio_clamp=log_ratio_clamp, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                         norm_length=norm_length, weights=weights, ignore_index=ignore_index)
    # Validate and promote the token tensors the way ppo_loss does (on a float32 stand-in
    # for the log-probs), and the scalars into the policy op's coefficients.
    clip_low = V.number(op, "clip_low", clip_low, low=0.0, high=1.0, low_open=True, high_open=True)
    clip_high = clip_low if clip_high is None else V.number(op, "clip_high", clip_high, low=0.0, low_open=True)
    if dual_clip is not None:
        dual_clip = V.number(op, "dual_clip", dual_clip, low=1.0, low_open=True)
    log_ratio_clamp = _token_loss.optional_positive(op, "log_ratio_clamp", log_ratio_clamp, finite=False)
    num_tokens, num_seqs, norm_length = _token_loss.normalisers(op, agg, num_tokens, num_seqs, norm_length)
    stand_in = torch.empty(labels.shape, dtype=torch.float32, device=device)
    (_, old_logprobs, advantages, weights, ref_logprobs), _, _ = _token_loss.token_tensors(
        op, "logprobs", stand_in,
        {"old_logprobs": old_logprobs, "advantages": advantages, "weights": weights,
         "ref_logprobs": ref_logprobs if beta > 0 else None},
        None, per_row=("advantages",), required=("old_logprobs", "advantages"))
    token_dtype = torch.float32 if old_logprobs.dtype != torch.float64 else torch.float64
    old_logprobs, advantages, weights, ref_logprobs = (
        None if t is None else t.to(token_dtype) for t in (old_logprobs, advantages, weights, ref_logprobs))
    coefficients = [clip_low, clip_high, _token_loss.off_or(dual_clip), _token_loss.off_or(log_ratio_clamp), beta,
                    _token_loss.count_or(num_tokens), _token_loss.count_or(num_seqs), _token_loss.count_or(norm_length)]
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    # the chunk rows come from the tile rule (C++, csrc/core/lm_head.h) inside the op's body,
    # which torch.compile does not trace: 0 asks for the budget's
    args = (hidden.contiguous(), weight.contiguous(), labels, bias, old_logprobs, advantages, valid, weights,
            ref_logprobs, coefficients, kl if beta > 0 else "none", agg, entropy_coef, temperature, ignore_index,
            chunk_size or 0, chosen, needs)
    if not _chunked.eager(hidden, weight, bias, labels, old_logprobs, advantages, valid, weights, ref_logprobs):
        loss, stats, _, _, _ = torch.ops.rlkernels.linear_policy_loss(*args)
    elif any(needs):
        loss, stats, _, _, _ = _Eager.apply(*args)
    else:
        loss, stats, _, _, _ = _sweep(*args)
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


# ---- the op: one sweep over chunks, gradients included -------------------------------------

def _kernels(backend: str):
    return tuple(_registry.kernel(name, backend) for name in ("logprobs", "logprobs_backward_inplace", "policy_loss"))


# Below this many multiply-adds of the lm-head (B * T * V * H), masked tokens go through
# it: dropping them costs a gather, two scatters and a host read (tens of microseconds).
_EVERY_TOKEN_MACS = 1 << 20


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _piece(t: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dim() == 1:  # per-sequence advantages
        return t[rows]
    return t[rows, cols].contiguous()


def _check_op_args(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs, needs):
    """The shapes the op's pieces are cut by, checked for direct calls of the op (the
    row and loss kernels it calls check the rest)."""
    def need(condition, message):
        if not condition:
            raise RuntimeError(f"linear_policy_loss: {message}")

    need(hidden.dim() == 3 and weight.dim() == 2 and weight.shape[1] == hidden.shape[2],
         f"hidden must be [B, T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    B, T = hidden.shape[:2]
    need(bias is None or tuple(bias.shape) == (weight.shape[0],), "bias must be [V]")
    need(labels.dtype == torch.int64 and tuple(labels.shape) == (B, T), f"labels must be int64 [{B}, {T}]")
    need(valid.dtype == torch.bool and tuple(valid.shape) == (B, T), f"valid must be bool [{B}, {T}]")
    for name, t in (("old_logprobs", old_logprobs), ("weights", weights), ("ref_logprobs", ref_logprobs)):
        need(t is None or tuple(t.shape) == (B, T), f"{name} must be [{B}, {T}]")
    need(tuple(advantages.shape) in ((B,), (B, T)), f"advantages must be [{B}] or [{B}, {T}]")
    need(len(needs) == 3, "needs holds 3 flags (hidden, weight, bias)")


@custom_op("rlkernels::linear_policy_loss", mutates_args=())
def _linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        bias: Optional[torch.Tensor], old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        valid: torch.Tensor, weights: Optional[torch.Tensor], ref_logprobs: Optional[torch.Tensor],
                        coefficients: list[float], kl: str, agg: str, entropy_coef: float, temperature: float,
                        ignore_index: int, chunk_size: int, backend: str, needs: list[bool]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sweep(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs, coefficients,
                  kl, agg, entropy_coef, temperature, ignore_index, chunk_size, backend, needs)


def _sweep(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs, coefficients, kl, agg,
           entropy_coef, temperature, ignore_index, chunk_size, backend, needs):
    """The op's body: (loss, stats, grad_hidden, grad_weight, grad_bias); chunk_size 0: the
    chunk rows from the budget."""
    _check_op_args(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs, needs)
    row_forward, row_backward_inplace, policy = _kernels(backend)
    B, T, H = hidden.shape
    vocab = weight.shape[0]
    chunk = _chunked.chunk_rows(B * T, vocab, chunk_size or None)
    needs_hidden, needs_weight, needs_bias = needs[0], needs[1], needs[2] and bias is not None
    any_grad = needs_hidden or needs_weight or needs_bias
    with_entropy = entropy_coef != 0.0
    acc = old_logprobs.dtype
    wide = weight.dtype in (torch.float16, torch.bfloat16)
    grad_hidden = torch.zeros_like(hidden) if needs_hidden else hidden.new_empty(0)
    grad_weight = None if needs_weight else weight.new_empty(0)  # the first piece's product, then sums
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if needs_bias else weight.new_empty(0)
    flat_hidden = hidden.reshape(B * T, H)
    flat_grad_hidden = grad_hidden.reshape(B * T, H) if needs_hidden else None
    buffer = hidden.new_empty((_chunked.padded_rows(min(chunk, B * T)), vocab)) if B * T > 0 else None
    # float64 totals from the first piece on: loss, tokens, stats x tokens, ratio max, entropy sum
    loss = tokens = sums = ratio_max = entropy_sum = None
    # Masked tokens are dropped before the lm-head where the mask may be read; on CUDA outside
    # the checked mode (_ppo_pieces.py) and in small problems every token goes through it.
    on_device = _ppo_pieces.on_device(valid)
    every_token = on_device or B * T * vocab * H <= _EVERY_TOKEN_MACS
    for rows, cols, piece_agg, piece_coefficients, scale in _ppo_pieces.pieces(valid, chunk, agg, coefficients):
        whole = rows == slice(0, B) and cols == slice(0, T)  # the batch in one piece: no slicing
        piece_valid = valid if whole else valid[rows, cols]
        def zeros():
            return torch.zeros(piece_valid.shape, dtype=acc, device=hidden.device)

        if every_token:
            flat = _ppo_pieces.span(rows, cols, T)
            kept_hidden, kept_labels = flat_hidden[flat], labels.reshape(-1)[flat]
            if not on_device:  # a masked token's hidden state (NaN, inf) must not reach grad weight as 0 * NaN
                kept_hidden = torch.where(piece_valid.reshape(-1, 1), kept_hidden, 0)
            n = kept_hidden.shape[0]
        else:
            token_index = torch.arange(B * T, device=hidden.device).reshape(B, T)
            kept = token_index[rows, cols][piece_valid]
            n = kept.numel()
        if n > 0:
            if not every_token:
                kept_hidden = flat_hidden.index_select(0, kept)
                kept_labels = labels.reshape(-1).index_select(0, kept)
            # the logits linear_logprobs gives these tokens, bit for bit (on-policy ratio 1)
            logits = _chunked.row_logits(buffer, kept_hidden, weight, bias)
            lp, ent, saved = row_forward(logits, kept_labels, temperature, ignore_index, with_entropy, True)
            if every_token:  # ignored tokens: 0 from the row kernel
                logprobs = lp.to(acc).reshape(piece_valid.shape)
                entropy = ent.to(acc).reshape(piece_valid.shape) if with_entropy else None
            else:
                logprobs = zeros()
                logprobs[piece_valid] = lp.to(acc)
                entropy = zeros() if with_entropy else None
                if with_entropy:
                    entropy[piece_valid] = ent.to(acc)
        else:
            logprobs, entropy = zeros(), zeros() if with_entropy else None
        def piece(t):
            return t.contiguous() if whole and t is not None else _piece(t, rows, cols)

        piece_loss, piece_stats, grad, row_scale = policy(
            logprobs, piece(old_logprobs), piece(advantages), piece_valid, piece(weights), piece(ref_logprobs),
            piece_coefficients, kl, piece_agg, any_grad)
        if scale is not None:  # the batch's normalisation, as a device tensor (or a given count)
            row_scale = row_scale * (scale.to(row_scale.dtype) if isinstance(scale, torch.Tensor) else scale)
            piece_loss = piece_loss.double() * scale
        piece_stats = piece_stats.double()
        count = piece_stats[-1]
        piece_ratio_max = piece_stats[POLICY_STATS.index("ratio_max")]
        loss = _add(loss, piece_loss.double())
        if with_entropy:
            loss = loss - entropy_coef * (row_scale.double() * entropy.double().sum(-1)).sum()
        tokens = _add(tokens, count)
        sums = _add(sums, piece_stats[:-1] * count)
        # ratios are >= 0 (or NaN, which maximum keeps), as the 0 the totals start from
        ratio_max = piece_ratio_max if ratio_max is None else torch.maximum(ratio_max, piece_ratio_max)
        if with_entropy:
            entropy_sum = _add(entropy_sum, entropy.double().sum())
        if n == 0 or not any_grad:
            continue
        def kept_values(t):  # the kept tokens' values, in the order of the rows of logits
            return t.reshape(-1).contiguous() if every_token else t[piece_valid]

        grad_logprobs = kept_values(grad * row_scale.unsqueeze(-1)).float()
        grad_entropy = None
        if with_entropy:
            grad_entropy = kept_values((-entropy_coef * row_scale.unsqueeze(-1)).expand(piece_valid.shape)).float()
        row_backward_inplace(grad_logprobs, grad_entropy, logits, kept_labels, saved, ent, temperature,
                             ignore_index)
        if needs_hidden and every_token:
            torch.mm(logits, weight, out=flat_grad_hidden[flat])
        elif needs_hidden:
            flat_grad_hidden.index_copy_(0, kept, torch.mm(logits, weight))
        if needs_weight and grad_weight is None:  # no [V, H] zero fill and read-back for one piece
            grad_weight = torch.mm(logits.t(), kept_hidden).to(torch.float32 if wide else weight.dtype)
        elif needs_weight and wide:
            grad_weight.add_(torch.mm(logits.t(), kept_hidden))
        elif needs_weight:
            grad_weight.addmm_(logits.t(), kept_hidden)
        if needs_bias:
            grad_bias.add_(logits.sum(0, dtype=torch.float32))
    if loss is None:  # no piece: an empty batch, or no valid token in any row
        zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
        loss = tokens = ratio_max = zero
        sums = torch.zeros(len(POLICY_STATS) - 1, dtype=torch.float64, device=hidden.device)
    means = torch.where(tokens > 0, sums / tokens.clamp(min=1), 0)
    means[POLICY_STATS.index("ratio_max")] = ratio_max
    entropy_mean = (torch.where(tokens > 0, entropy_sum / tokens.clamp(min=1), 0) if entropy_sum is not None
                    else torch.zeros((), dtype=torch.float64, device=hidden.device))
    stats = torch.cat([means, tokens.reshape(1), entropy_mean.reshape(1)]).to(acc)
    if grad_weight is None:  # no token reached the lm-head
        grad_weight = torch.zeros_like(weight)
    elif needs_weight and wide:
        grad_weight = grad_weight.to(weight.dtype)
    if needs_bias:
        grad_bias = grad_bias.to(bias.dtype)
    return loss.to(acc), stats, grad_hidden, grad_weight, grad_bias


@register_fake("rlkernels::linear_policy_loss")
def _linear_policy_loss_fake(hidden, weight, labels, bias, old_logprobs, advantages, valid, weights, ref_logprobs,
                             coefficients, kl, agg, entropy_coef, temperature, ignore_index, chunk_size, backend,
                             needs):
    acc = old_logprobs.dtype
    needs_bias = needs[2] and bias is not None
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((len(STATS),), dtype=acc),
            hidden.new_empty(hidden.shape if needs[0] else (0,)), weight.new_empty(weight.shape if needs[1] else (0,)),
            weight.new_empty(bias.shape if needs_bias else (0,)))


def _setup_context(ctx, inputs, output):
    _, stats, grad_hidden, grad_weight, grad_bias = output
    hidden, weight, _, bias = inputs[:4]
    # the inputs for first_order_only only (references, no copies)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, hidden, weight, bias)
    ctx.mark_non_differentiable(stats, grad_hidden, grad_weight, grad_bias)
    # The stored gradients get no incoming gradient: no weight-sized zeros for them.
    ctx.set_materialize_grads(False)


def _scaled(saved: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    # The usual loss.backward() passes grad_loss = 1: hand the stored gradient over as it
    # is (no second weight-sized buffer, nothing mutated).  Traced (compile, opcheck), on
    # CUDA outside the checked mode (reading grad_loss would be a host sync) or for any
    # other grad_loss, scale out of place.
    if (type(saved) is torch.Tensor and type(grad_loss) is torch.Tensor and _checkmode.reads_data(grad_loss)
            and bool(grad_loss == 1)):
        return saved
    return saved * grad_loss.to(saved.dtype)


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 18
    # (an empty batch's hidden gradient is empty but still wanted: ask needs_input_grad)
    grad_hidden, grad_weight, grad_bias = (_scaled(saved, grad_loss) if ctx.needs_input_grad[i] else None
                                           for saved, i in zip(ctx.saved_tensors[:3], (0, 1, 3)))
    grad_hidden, grad_weight, grad_bias = _double_backward.first_order_only(
        "linear_ppo_loss", (grad_hidden, grad_weight, grad_bias), ctx.saved_tensors[3:])
    return (grad_hidden, grad_weight, None, grad_bias) + (None,) * 14


torch.library.register_autograd("rlkernels::linear_policy_loss", _backward, setup_context=_setup_context)


# eager calls (_chunked.eager): the body without the custom op's dispatch and Python autograd
_Eager = _chunked.eager_function(_sweep, _setup_context, _backward)
