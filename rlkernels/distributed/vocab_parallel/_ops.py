"""The vocabulary-parallel ops: autograd functions and the public entry points
(rlkernels.distributed.vocab_parallel; the package docstring has the design)."""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ... import _validate as V
from ...ops import _chunked
from ...ops._registry import kernel
from ...ops import _logits as L
from ._comm import VocabParallelMismatchError, all_reduce_sum, gather_stats, layout
from ._stats import (CHUNK_STAT_WIDTH, KL_CHUNK_STAT_WIDTH, STAT_WIDTH, VOCAB_CHUNK, backward_logits, empty_state,
                     exact_chunk_state, fold_exact, fold_exact_kl, klreference_backward, kl_shard_stats, owned,
                     reference_backward, shard_state, stat_dtype, tile_ops, merge_kl_stats, merge_softmax_stats)


def _choose(fn, backend, device, dtype, exact=False):
    chosen = L.choose_backend(fn, backend, device, dtype)
    if exact and chosen != "cpu":
        raise ValueError(f"{fn}: exact=True folds the chunk statistics with the CPU kernels, so it needs CPU tensors "
                         f"and backend 'cpu' or 'auto'; got backend {backend!r} on {device}")
    return chosen


def _exact_layout(fn, where) -> None:
    """exact=True needs every shard (but empty ones) to start on a chunk edge: raised on
    every rank alike (they all hold the same shard table) before any statistics move."""
    for r, (start, size) in enumerate(zip(where.starts, where.sizes)):
        if size and start % VOCAB_CHUNK:
            raise VocabParallelMismatchError(
                f"rlkernels.distributed.vocab_parallel.{fn}: exact=True needs every shard to start on a multiple "
                f"of the vocabulary chunk ({VOCAB_CHUNK} columns), but rank {r} starts at column {start} (shard "
                f"sizes in rank order: {where.sizes}); nothing was written", fn=fn, rank=where.rank,
                size=where.size, stage="check")


# ---- logprobs ----------------------------------------------------------------------------------

class _LogprobsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, where, temperature, ignore_index, with_entropy, backend, exact):
        n, width = labels.numel(), logits.shape[-1]
        x = logits.reshape(n, width)
        flat = labels.reshape(n)
        if exact:
            state = exact_chunk_state(n, where, logits.device)
            if width:  # this shard's chunks into their slots
                tile_ops("cpu")[0](x, flat, state, temperature, ignore_index, where.vocab_start, with_entropy, False)
            logprob, entropy, saved = fold_exact(where, state, flat, temperature, ignore_index, with_entropy,
                                                 lambda mine: gather_stats(where, mine))
        else:
            state = empty_state(n, logits.device, stat_dtype(logits.dtype))
            if width:
                shard_state(x, flat, state, temperature, ignore_index, where.vocab_start, with_entropy, backend)
            stats = torch.cat([state, owned(flat, where.vocab_start, width, state.dtype)[:, None]], 1)
            gathered = gather_stats(where, stats)
            logprob, entropy, saved = merge_softmax_stats(gathered, temperature, flat != ignore_index)
        ctx.save_for_backward(logits, labels, saved, entropy)
        ctx.options = (temperature, ignore_index, where.vocab_start, backend, with_entropy)
        lead = labels.shape
        return logprob.reshape(lead), entropy.reshape(lead)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp, grad_h):
        logits, labels, saved, entropy = ctx.saved_tensors
        temperature, ignore_index, vocab_start, backend, with_entropy = ctx.options
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        n, width = labels.numel(), logits.shape[-1]
        wide = saved.dtype
        g = torch.zeros(n, dtype=wide, device=logits.device) if grad_lp is None else \
            grad_lp.reshape(n).to(wide).contiguous()
        gh = None if (grad_h is None or not with_entropy) else grad_h.reshape(n).to(wide).contiguous()
        if width == 0:
            return (torch.zeros_like(logits),) + (None,) * 7
        grad = backward_logits(g, gh, logits.reshape(n, width), labels.reshape(n).to(torch.int64).contiguous(),
                                saved, entropy, temperature, ignore_index, vocab_start, backend)
        return (grad.reshape(logits.shape),) + (None,) * 7


def _labels(fn: str, labels, like: torch.Tensor, like_name: str) -> None:
    """Global label ids of like's leading shape, on its device (values are checked across
    the ranks by the header exchange)."""
    V.tensor(fn, "labels", labels, dtypes=V.INDEX_DTYPES)
    if labels.shape != like.shape[:-1]:
        raise ValueError(f"{fn}: labels must have the leading shape of {like_name} {tuple(like.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"{fn}: labels is on {labels.device} but {like_name} is on {like.device}")


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, group, temperature: float = 1.0,
             ignore_index: int = -100, entropy: bool = False, vocab_start: int | None = None, check: bool = True,
             timeout=None, exact: bool = False, backend: str = "auto"):
    """rlkernels.logprobs on a vocabulary sharded over `group`: `logits` [..., V_r] is this
    rank's contiguous shard (shards in rank order; sizes may differ), labels are global
    ids.  Every rank gets the log-probs (and entropy) over the full vocabulary; the
    gradient reaches this rank's logits shard.  exact=True (CPU; every shard starting on
    a multiple of VOCAB_CHUNK columns): the unsharded CPU op's bits, values and gradients."""
    fn = "logprobs"
    L.logits_tensor(fn, "logits", logits)
    ignore_index = L.index(fn, "ignore_index", ignore_index)
    temperature = L.temperature(fn, temperature)
    _labels(fn, labels, logits, "logits")
    exact = V.flag(fn, "exact", exact)
    chosen = _choose(fn, backend, logits.device, logits.dtype, exact)
    where = layout(fn, group, tokens=labels.numel(), local_vocab=logits.shape[-1], dtype=logits.dtype,
                   device=logits.device, labels=labels, ignore_index=ignore_index,
                   settings=(temperature, ignore_index, bool(entropy), exact), check=check, vocab_start=vocab_start,
                   timeout=timeout, every_shard=exact)
    if exact:
        _exact_layout(fn, where)
    values, entropies = _LogprobsFn.apply(logits, labels.to(torch.int64).contiguous(), where, temperature,
                                          ignore_index, bool(entropy), chosen, exact)
    return (values, entropies) if entropy else values


class _KlFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, mask, where, temperature, backend, exact):
        width = logits.shape[-1]
        n = logits.numel() // width if width else math.prod(logits.shape[:-1])
        a, b = logits.reshape(n, width), ref_logits.reshape(n, width)
        flat_mask = None if mask is None else mask.reshape(n)
        if exact:
            kl, saved = fold_exact_kl(where, a, b, temperature, lambda mine: gather_stats(where, mine))
            if flat_mask is not None:  # as the unsharded kernel writes masked rows: 0 everywhere
                saved = torch.where(flat_mask[:, None], saved, 0.0)
        else:
            stats = kl_shard_stats(a, b, temperature, backend, flat_mask).to(stat_dtype(logits.dtype))
            gathered = gather_stats(where, stats)
            kl, saved = merge_kl_stats(gathered, temperature)
        if flat_mask is not None:
            kl = torch.where(flat_mask, kl, 0.0)
        ctx.save_for_backward(logits, ref_logits, mask, saved)
        ctx.options = (temperature, backend)
        return kl.reshape(logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        logits, ref_logits, mask, saved = ctx.saved_tensors
        temperature, backend = ctx.options
        need_a, need_b = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if not (need_a or need_b):
            return (None,) * 7
        width = logits.shape[-1]
        n = saved.shape[0]
        if width == 0:
            return (torch.zeros_like(logits) if need_a else None, torch.zeros_like(ref_logits) if need_b else None,
                    None, None, None, None, None)
        a, b = logits.reshape(n, width), ref_logits.reshape(n, width)
        g = grad_kl.reshape(n).to(saved.dtype).contiguous()
        flat_mask = None if mask is None else mask.reshape(n)
        if backend == "reference":
            ga, gb = klreference_backward(g, a, b, flat_mask, saved, temperature)
        else:
            ga, gb = kernel("kl_from_logits_backward", backend)(g, a, b, flat_mask, saved, temperature, need_a, need_b)
        return (ga.reshape(logits.shape) if need_a else None, gb.reshape(ref_logits.shape) if need_b else None,
                None, None, None, None, None)


def kl_from_logits(logits: torch.Tensor, ref_logits: torch.Tensor, *, group, temperature: float = 1.0,
                   mask: torch.Tensor | None = None, check: bool = True, timeout=None, exact: bool = False,
                   backend: str = "auto"):
    """rlkernels.kl_from_logits on a vocabulary sharded over `group`: both logits are this
    rank's shard [..., V_r] of the same columns.  Every rank gets KL(pi || pi_ref) over the
    full vocabulary; gradients reach this rank's shards.  exact=True (as logprobs'): the
    unsharded CPU op's KL and gradients bit for bit."""
    fn = "kl_from_logits"
    device, mask = L.logits_pair(fn, logits, ref_logits, mask)
    temperature = L.temperature(fn, temperature)
    exact = V.flag(fn, "exact", exact)
    chosen = _choose(fn, backend, device, logits.dtype, exact)
    where = layout(fn, group, tokens=math.prod(logits.shape[:-1]), local_vocab=logits.shape[-1], dtype=logits.dtype,
                   device=device, labels=None, ignore_index=0, settings=(temperature, mask is not None, exact),
                   check=check, vocab_start=None if check else 0, timeout=timeout, every_shard=exact)
    if exact:
        _exact_layout(fn, where)
    return _KlFn.apply(logits, ref_logits, None if mask is None else mask.to(torch.bool), where, temperature, chosen,
                       exact)


# ---- linear_logprobs ---------------------------------------------------------------------------

class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, where, temperature, ignore_index, with_entropy, backend,
                reduce_hidden_grad, exact):
        n, width = labels.shape[0], weight.shape[0]
        # exact: the unsharded op's tiles, sized from the whole vocabulary (its blocks, VOCAB_BLOCK
        # wide, start on chunk edges in every shard), each tile into its chunks' slots
        tiles = _chunked.lm_head_tiles(n, where.vocab if exact else width)
        if exact:
            state = exact_chunk_state(n, where, hidden.device)
            tile, _ = tile_ops("cpu")
            for t0, t1, v0, _v1, logits in _chunked.tiled_logits(hidden, weight, bias, tiles):
                tile(logits, labels[t0:t1], state[t0:t1], temperature, ignore_index, where.vocab_start + v0,
                     with_entropy, False)
            logprob, entropy, saved = fold_exact(where, state, labels, temperature, ignore_index, with_entropy,
                                                 lambda mine: gather_stats(where, mine))
            ctx.save_for_backward(hidden, weight, bias, labels, saved, entropy)
            ctx.options = (where, temperature, ignore_index, with_entropy, backend, reduce_hidden_grad, exact)
            return logprob, entropy
        state = empty_state(n, hidden.device, stat_dtype(hidden.dtype))
        if backend == "reference":
            if width:
                logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
                shard_state(logits, labels, state, temperature, ignore_index, where.vocab_start, with_entropy,
                             backend)
        else:
            for t0, t1, v0, _v1, logits in _chunked.tiled_logits(hidden, weight, bias, tiles):
                shard_state(logits, labels[t0:t1], state[t0:t1], temperature, ignore_index, where.vocab_start + v0,
                             with_entropy, backend)
        stats = torch.cat([state, owned(labels, where.vocab_start, width, state.dtype)[:, None]], 1)
        gathered = gather_stats(where, stats)
        logprob, entropy, saved = merge_softmax_stats(gathered, temperature, labels != ignore_index)
        ctx.save_for_backward(hidden, weight, bias, labels, saved, entropy)
        ctx.options = (where, temperature, ignore_index, with_entropy, backend, reduce_hidden_grad, exact)
        return logprob, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp, grad_h):
        hidden, weight, bias, labels, saved, entropy = ctx.saved_tensors
        where, temperature, ignore_index, with_entropy, backend, reduce_hidden_grad, exact = ctx.options
        needs = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
                 bias is not None and bool(ctx.needs_input_grad[2]))
        if not any(needs):
            return (None,) * 11
        n = labels.shape[0]
        g = torch.zeros(n, dtype=saved.dtype, device=hidden.device) if grad_lp is None else \
            grad_lp.to(saved.dtype).contiguous()
        gh = grad_h.to(saved.dtype).contiguous() if (with_entropy and grad_h is not None) else None
        if backend == "reference":
            logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
            dl = reference_backward(g, gh, logits, labels, saved, entropy, temperature, ignore_index,
                                     where.vocab_start)
            grads = (dl @ weight.double(), dl.t() @ hidden.double(), dl.sum(0))
            grad_hidden, grad_weight, grad_bias = (x.to(hidden.dtype) for x in grads)
        else:
            _, backward = tile_ops(backend)
            # exact: the unsharded backward's rows (ignored ones dropped) and tiles, so the weight
            # and bias gradients come from the same sums
            rows = _chunked.kept_rows(labels, ignore_index) if exact else None
            kept = [t if rows is None or t is None else t[rows] for t in (hidden, labels, g, gh, saved, entropy)]
            kept_hidden, kept_labels, kept_g, kept_gh, kept_saved, kept_entropy = kept
            tiles = _chunked.lm_head_tiles(kept_hidden.shape[0], where.vocab if exact else weight.shape[0])

            def grad_logits(t0, t1, v0, v1, logits):
                return backward(kept_g[t0:t1], None if kept_gh is None else kept_gh[t0:t1], logits,
                                kept_labels[t0:t1], kept_saved[t0:t1], kept_entropy[t0:t1], temperature,
                                ignore_index, where.vocab_start + v0)

            grad_hidden, grad_weight, grad_bias = _chunked.chunked_linear_backward(
                kept_hidden, weight, bias, tiles, grad_logits, (needs[0], needs[1], needs[2]))
            if needs[0] and rows is not None:
                grad_hidden = torch.zeros(hidden.shape, dtype=grad_hidden.dtype,
                                          device=hidden.device).index_copy_(0, rows, grad_hidden)
        if needs[0] and reduce_hidden_grad and where.size > 1:
            wide = grad_hidden.to(torch.float32) if grad_hidden.dtype in (torch.float16, torch.bfloat16) \
                else grad_hidden
            grad_hidden = all_reduce_sum(where, wide, "the hidden-gradient all-reduce").to(hidden.dtype)
        return (grad_hidden if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] else None) + (None,) * 8


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, group,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                    entropy: bool = False, vocab_start: int | None = None, check: bool = True, timeout=None,
                    reduce_hidden_grad: bool = True, exact: bool = False, backend: str = "auto"):
    """rlkernels.linear_logprobs with the lm-head sharded over `group`: weight [V_r, H]
    (and bias [V_r]) are this rank's rows of the full [V, H] head, in rank order; hidden
    and labels (global ids) are the same on every rank.  Every rank gets the full-vocabulary
    log-probs; weight and bias get this shard's gradient; hidden gets the sum over the
    shards (one all-reduce of [N, H] in the backward) unless reduce_hidden_grad=False.
    exact=True (as logprobs'): the unsharded op's log-probs, entropy and weight and bias
    gradients bit for bit; the hidden gradient sums the shards in another order."""
    fn = "linear_logprobs"
    device = L.lm_head(fn, hidden, weight, bias, rows="V_r")
    ignore_index = L.index(fn, "ignore_index", ignore_index)
    temperature = L.temperature(fn, temperature)
    _labels(fn, labels, hidden, "hidden")
    exact = V.flag(fn, "exact", exact)
    chosen = _choose(fn, backend, device, hidden.dtype, exact)
    where = layout(fn, group, tokens=labels.numel(), local_vocab=weight.shape[0], dtype=hidden.dtype, device=device,
                   labels=labels, ignore_index=ignore_index,
                   settings=(temperature, ignore_index, bool(entropy), hidden.shape[-1], exact), check=check,
                   vocab_start=vocab_start, timeout=timeout, every_shard=exact)
    if exact:
        _exact_layout(fn, where)
    lead = labels.shape
    flat_hidden = hidden.reshape(labels.numel(), hidden.shape[-1]).contiguous()
    values, entropies = _LinearFn.apply(flat_hidden, weight.contiguous(), bias, labels.reshape(-1).to(torch.int64),
                                        where, temperature, ignore_index, bool(entropy), chosen,
                                        bool(reduce_hidden_grad), exact)
    values, entropies = values.reshape(lead), entropies.reshape(lead)
    return (values, entropies) if entropy else values


# ---- linear_ppo_loss ---------------------------------------------------------------------------

def linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor | None = None, *, group,
                    ref_logprobs: torch.Tensor | None = None, beta: float = 0.0, kl: str = "k3",
                    entropy_coef: float = 0.0, temperature: float = 1.0, bias: torch.Tensor | None = None,
                    ignore_index: int = -100, vocab_start: int | None = None, check: bool = True, timeout=None,
                    reduce_hidden_grad: bool = True, exact: bool = False, backend: str = "auto", **loss_options):
    """rlkernels.linear_ppo_loss with the lm-head sharded over `group` (as linear_logprobs
    above): the log-probs (and entropy) over the full vocabulary, then the same policy
    loss on every rank.  loss_options: ppo_loss's (clip_low, clip_high, dual_clip,
    log_ratio_clamp, agg, num_tokens, num_seqs, norm_length, weights)."""
    from ...ops.linear_ppo_loss import loss_from_logprobs
    from ...reference.policy_loss import KL_ESTIMATORS

    fn = "linear_ppo_loss"
    V.tensor(fn, "hidden", hidden, dtypes=L.LOGIT_DTYPES, ndim=3)
    V.tensor(fn, "labels", labels, ndim=2)
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{fn}: labels must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    beta = V.number(fn, "beta", beta, low=0.0, finite=True)
    entropy_coef = V.number(fn, "entropy_coef", entropy_coef, finite=True)
    V.choice(fn, "kl", kl, KL_ESTIMATORS)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"{fn}: beta > 0 needs ref_logprobs")
    unknown = set(loss_options) - set(_LOSS_OPTIONS)
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword arguments {sorted(unknown)}; loss options are {_LOSS_OPTIONS}")
    options = {**_LOSS_DEFAULTS, **loss_options}
    ignore_index = L.index(fn, "ignore_index", ignore_index)
    valid = V.binary_mask(fn, "mask", mask, labels.shape, labels.device)
    if valid is not None:  # masked tokens take no part: give them the ignored label
        labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    valid = labels != ignore_index
    with_entropy = entropy_coef != 0.0
    out = linear_logprobs(hidden, weight, labels, group=group, bias=bias, temperature=temperature,
                          ignore_index=ignore_index, entropy=with_entropy, vocab_start=vocab_start, check=check,
                          timeout=timeout, reduce_hidden_grad=reduce_hidden_grad, exact=exact, backend=backend)
    logprobs, entropy = out if with_entropy else (out, None)
    return loss_from_logprobs(fn, logprobs, entropy, old_logprobs, advantages, valid, ref_logprobs=ref_logprobs,
                              beta=beta, kl=kl, entropy_coef=entropy_coef, backend=backend, **options)


_LOSS_DEFAULTS = {"clip_low": 0.2, "clip_high": None, "dual_clip": None, "log_ratio_clamp": 20.0,
                  "agg": "token-mean", "num_tokens": None, "num_seqs": None, "norm_length": None, "weights": None}
_LOSS_OPTIONS = tuple(_LOSS_DEFAULTS)


def traffic_bytes(tokens: int, world: int, *, kind: str = "logprobs", shard_chunks: int | None = None) -> int:
    """Bytes each rank receives for the statistics exchange of one call: an all_gather of
    STAT_WIDTH float32 a token from every other rank or, in the exact mode (shard_chunks:
    the chunks of the widest shard, ceil(V_r / VOCAB_CHUNK)), CHUNK_STAT_WIDTH float32 a
    chunk and token (KL_CHUNK_STAT_WIDTH for kind="kl")."""
    if kind not in ("logprobs", "kl"):
        raise ValueError(f"traffic_bytes: kind must be 'logprobs' or 'kl', got {kind!r}")
    if shard_chunks is None:
        per_token = STAT_WIDTH  # both families send STAT_WIDTH values a token
    else:
        per_token = (KL_CHUNK_STAT_WIDTH if kind == "kl" else CHUNK_STAT_WIDTH) * shard_chunks
    return tokens * per_token * 4 * (world - 1)


