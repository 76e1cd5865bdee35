"""rlkernels.linear_logprobs: per-token log-probs (and entropy) straight from
hidden states and the lm-head, holding at most chunk_size x V logits at a time.
Optionally also two row statistics TRL's fused lm-head reports: the mean logit
over the vocabulary and whether the label is the arg-max.

Forward: for each tile of [tokens, vocabulary block], logits = hidden @ weight.T
(+ bias) into one reused buffer, then the fused tile kernel, which merges the
tile into each token's running softmax statistics and, at the row's last block,
writes its log-prob, entropy and the row statistics the backward keeps (8 bytes
a token).  Backward: the same tiles recomputed, turned into d loss / d logits in
place by the fused backward kernel, and fed to the matmuls for hidden, weight
and bias.  When all the tiles fit that budget at once (small problems, the
default tile size, eager mode), the forward keeps them for the backward instead
of reusing one buffer, and the backward skips the recomputation (three matmuls
instead of four; _keeps_tiles).  Rows whose label is ignore_index are dropped before any matmul, except
on CUDA outside the checked mode (finding them would be a host sync): there they
go through the matmuls and the kernels give them 0 and no gradient.

The mean logit needs no pass over the logits: the mean over the vocabulary of
hidden @ weight.T + bias is hidden @ mean(weight) + mean(bias), one [V, H]
column mean (accumulated in float64) and a matrix-vector product in float32.
Whether the label is the arg-max comes from the tile kernel, which tracks it in a
fifth state value per row (csrc/core/logprobs.h)."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.library import custom_op, register_fake

from .. import reference
from . import _chunked, _double_backward, _registry
from . import _logits as L

__all__ = ["linear_logprobs"]

_OP = "linear_logprobs"


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                    entropy: bool = False, mean_logits: bool = False, is_top1: bool = False,
                    chunk_size: int | tuple[int, int] | None = None, group=None, exact: bool = False,
                    backend: str = "auto"):
    """log softmax((hidden @ weight.T + bias) / temperature)[label] per token, without
    materialising the [N, V] logits.

    hidden: `[..., H]`; weight: the lm-head `[V, H]` of hidden's dtype (float32, bfloat16,
    float16; float64 runs on the reference); bias: `[V]` or None; labels: int of hidden's
    leading shape, in [0, V) or ignore_index.  chunk_size: the logits held at a time, as
    a number of full rows (default: as many as 64 MiB of float32 logits hold); peak extra
    memory is about chunk_size x V logits, spent on tiles of vocabulary blocks (4096
    wide) times tokens, forward and backward (when all the kept tokens' logits fit, they
    are held from the forward to the backward, which then need not recompute them); or
    a (tokens, vocabulary) pair fixing the tile (always recomputed).  Returns float32 log-probs of the leading shape, 0 on ignored tokens;
    gradients flow to hidden, weight and bias.  With any of the flags, a tuple: the
    log-probs, then for each flag set, in this order, entropy (float32, with gradient),
    mean_logits (the mean over the vocabulary of the temperature-scaled logits,
    float32, no gradient) and is_top1 (bool: the label's logit is the largest and no
    earlier column's equals it, as argmax picks the first maximum; False where a row
    holds NaN).  Ignored tokens get 0 and False.
    group: a torch.distributed process group over which the vocabulary is sharded
    (tensor parallel): weight (and bias) are this rank's contiguous shard, shards in rank
    order, labels global ids; every rank gets the full-vocabulary result (docs/distributed.md,
    rlkernels.distributed.vocab_parallel for the keywords that tune it); exact=True there
    gives the unsharded CPU op's bits (CPU, shards on chunk edges; ignored without group).
    """
    if group is not None:
        unsupported = [name for name, on in (("mean_logits", mean_logits), ("is_top1", is_top1),
                                             ("chunk_size", chunk_size is not None)) if on]
        if unsupported:
            raise ValueError(f"{_OP}: {', '.join(unsupported)} not supported with group= (vocabulary-parallel)")
        from ..distributed import vocab_parallel

        return vocab_parallel.linear_logprobs(hidden, weight, labels, group=group, bias=bias, temperature=temperature,
                                              ignore_index=ignore_index, entropy=entropy, exact=exact, backend=backend)
    device = L.lm_head(_OP, hidden, weight, bias)
    ignore_index = L.index(_OP, "ignore_index", ignore_index)
    labels = L.labels_for(_OP, labels, hidden, ignore_index, vocab=weight.shape[0], logits_name="hidden")
    temperature = L.temperature(_OP, temperature)
    entropy, mean_logits, is_top1 = bool(entropy), bool(mean_logits), bool(is_top1)
    N = labels.numel()
    tile_tokens, tile_vocab, budget = _tiling(chunk_size, N, weight.shape[0])  # checked on every backend
    chosen = L.choose_backend(_OP, backend, device, hidden.dtype)
    if chosen == "reference":
        return reference.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, entropy=entropy, mean_logits=mean_logits,
                                         is_top1=is_top1)
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(labels.numel(), hidden.shape[-1])  # (-1 is ambiguous when H = 0)
    flat_labels = labels.reshape(-1)
    args = (flat_hidden, weight, flat_labels, bias, temperature, ignore_index, entropy, is_top1, tile_tokens,
            tile_vocab, budget, chosen)
    if not _chunked.eager(flat_hidden, weight, flat_labels, bias):
        values, entropies, _, top1 = torch.ops.rlkernels.linear_logprobs(*args)
    elif _chunked.wants_grad(flat_hidden, weight, bias):
        values, entropies, _, top1 = _Eager.apply(*args)
    else:
        values, entropies, _, top1 = _forward(*args)
    outputs = [values.reshape(lead)]
    if entropy:
        outputs.append(entropies.reshape(lead))
    if mean_logits:
        outputs.append(mean_logit(flat_hidden, weight, bias, temperature, flat_labels != ignore_index).reshape(lead))
    if is_top1:
        outputs.append(top1.reshape(lead))
    return tuple(outputs) if len(outputs) > 1 else outputs[0]


@torch.no_grad()
def mean_logit(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
               valid: torch.Tensor) -> torch.Tensor:
    """(hidden @ mean(weight) + mean(bias)) / temperature per row of [N, H] hidden, float32,
    0 where valid is False: the mean over the vocabulary of the logits, without them.
    The column mean accumulates in float64 one vocabulary block at a time (no float64
    copy of the weight)."""
    vocab = weight.shape[0]
    column_sum = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for v0 in range(0, vocab, _MEAN_BLOCK):
        column_sum += weight[v0:v0 + _MEAN_BLOCK].sum(0, dtype=torch.float64)
    mean_row = (column_sum / vocab).to(torch.float32)
    means = torch.mv(torch.where(valid[:, None], hidden, 0).to(torch.float32), mean_row)
    if bias is not None:  # added as a 0-dim float32 tensor: no host read of the bias
        means = means + (bias.sum(dtype=torch.float64) / vocab).to(torch.float32)
    return torch.where(valid, means / temperature, 0.0)


# vocabulary rows per block of the column mean (a float64 temporary of this many rows at most)
_MEAN_BLOCK = 4096


def _tiling(chunk_size, N: int, vocab: int) -> tuple[int, int, int]:
    """(tile tokens, tile vocabulary, budget) of the forward and backward tiles; 0 tile
    sizes mean "from the budget" (decided after ignored rows are dropped)."""
    def positive(value, what):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{_OP}: {what} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{_OP}: {what} must be >= 1, got {value}")
        return value

    if chunk_size is None:
        return 0, 0, _chunked.CHUNK_BYTES
    if isinstance(chunk_size, (tuple, list)):
        if len(chunk_size) != 2:
            raise ValueError(f"{_OP}: chunk_size must be an int or a (tokens, vocabulary) pair, got {chunk_size!r}")
        tokens, block = (positive(v, "chunk_size") for v in chunk_size)
        return tokens, block, _chunked.CHUNK_BYTES
    tokens = positive(chunk_size, "chunk_size")
    return 0, 0, max(1, min(tokens, max(N, 1))) * max(vocab, 1) * 4


def _keeps_tiles(n: int, vocab: int, tiles: tuple[int, int], fixed: bool, budget: int) -> bool:
    """Whether the forward keeps its tiles for the backward instead of the backward
    recomputing them: when all of them fit the budget at once (at most `budget` bytes
    of float32 logits, padded rows included) and the tile size was not fixed by the
    caller.  A small problem then does three matmuls instead of four (the fused
    backward's recomputation is a quarter of its time once the matmuls dominate);
    the logits it holds from forward to backward stay within what chunk_size allows."""
    chunk = tiles[0]
    rows = (n // chunk) * _chunked.padded_rows(chunk) + _chunked.padded_rows(n % chunk)
    return not fixed and rows * vocab * 4 <= budget


def _tiles(n: int, vocab: int, tile_tokens: int, tile_vocab: int, budget: int) -> tuple[int, int]:
    tokens, block = _chunked.lm_head_tiles(n, vocab, budget)
    return tile_tokens or tokens, tile_vocab or block


def _row_ops(backend: str):
    return _registry.kernel("logprobs_vocab_tile", backend), _registry.kernel("logprobs_backward_inplace", backend)


@custom_op("rlkernels::linear_logprobs", mutates_args=())
def _linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                     temperature: float, ignore_index: int, with_entropy: bool, with_top1: bool, tile_tokens: int,
                     tile_vocab: int, budget: int,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1, tile_tokens,
                    tile_vocab, budget, backend)


def _forward(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1, tile_tokens, tile_vocab,
             budget, backend, keep=None):
    """The op's body: (log-probs, entropies, saved row statistics, is_top1).  With a list
    `keep` (the eager path's backward), the tiles go into it when all of them fit the
    budget at once (_keeps_tiles)."""
    vocab_tile, _ = _row_ops(backend)
    N, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    rows = _chunked.kept_rows(labels, ignore_index)
    kept_hidden, kept_labels = (hidden, labels) if rows is None else (hidden[rows], labels[rows])
    n = kept_hidden.shape[0]
    # per kept token: running (max, sum, entropy sum, label logit), then (log p, H, max, ln s);
    # with_top1 adds the arg-max flag as a fifth value
    state = torch.empty(n, 5 if with_top1 else 4, **f32)
    if n > 0:
        tiles = _tiles(n, vocab, tile_tokens, tile_vocab, budget)
        if keep is not None and not _keeps_tiles(n, vocab, tiles, tile_tokens or tile_vocab, budget):
            keep = None
        for t0, t1, v0, v1, logits in _chunked.tiled_logits(kept_hidden, weight, bias, tiles, keep):
            vocab_tile(logits, kept_labels[t0:t1], state[t0:t1], temperature, ignore_index, v0, with_entropy,
                       v1 == vocab)
    no_top1 = torch.empty(0, dtype=torch.bool, device=hidden.device)
    if rows is None:  # every row went through the kernels: the outputs are state's columns (copies)
        def column(c):
            return state[:, c].clone(memory_format=torch.contiguous_format)

        return (column(0), column(1) if with_entropy else state.new_empty(0),
                state[:, 2:4].clone(memory_format=torch.contiguous_format),
                state[:, 4] != 0 if with_top1 else no_top1)
    values = torch.zeros(N, **f32)
    entropies = torch.zeros(N if with_entropy else 0, **f32)
    saved = torch.zeros(N, 2, **f32)
    top1 = torch.zeros(N, dtype=torch.bool, device=hidden.device) if with_top1 else no_top1
    values[rows] = state[:, 0]
    saved[rows] = state[:, 2:4]
    if with_entropy:
        entropies[rows] = state[:, 1]
    if with_top1:
        top1[rows] = state[:, 4] != 0
    return values, entropies, saved, top1


@register_fake("rlkernels::linear_logprobs")
def _linear_logprobs_fake(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1,
                          tile_tokens, tile_vocab, budget, backend):
    N = hidden.shape[0]
    return (hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N if with_entropy else 0, dtype=torch.float32),
            hidden.new_empty((N, 2), dtype=torch.float32), hidden.new_empty(N if with_top1 else 0, dtype=torch.bool))


@custom_op("rlkernels::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                              hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              bias: Optional[torch.Tensor], saved: torch.Tensor, entropies: torch.Tensor,
                              temperature: float, ignore_index: int, tile_tokens: int, tile_vocab: int, budget: int,
                              backend: str, needs_hidden: bool, needs_weight: bool,
                              needs_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_body(grad_logprobs, grad_entropy, hidden, weight, labels, bias, saved, entropies, temperature,
                          ignore_index, tile_tokens, tile_vocab, budget, backend, needs_hidden, needs_weight,
                          needs_bias)


def _backward_body(grad_logprobs, grad_entropy, hidden, weight, labels, bias, saved, entropies, temperature,
                   ignore_index, tile_tokens, tile_vocab, budget, backend, needs_hidden, needs_weight, needs_bias,
                   kept=None):
    """The backward op's body; `kept`: the forward's tiles (_forward's `keep`), if it kept them."""
    _, backward_inplace = _row_ops(backend)
    rows = _chunked.kept_rows(labels, ignore_index)
    N = hidden.shape[0]

    def pick(t):
        return t if rows is None or t is None or t.shape[0] != N else t[rows]

    kept_hidden, kept_labels, kept_grad, kept_grad_entropy, kept_saved, kept_entropies = (
        pick(t) for t in (hidden, labels, grad_logprobs, grad_entropy, saved, entropies))
    if kept_grad_entropy is None:
        kept_entropies = kept_entropies.new_empty(0)

    def grad_logits(t0, t1, v0, v1, logits):
        with_entropy = kept_grad_entropy is not None
        backward_inplace(kept_grad[t0:t1], kept_grad_entropy[t0:t1] if with_entropy else None, logits,
                         kept_labels[t0:t1], kept_saved[t0:t1],
                         kept_entropies[t0:t1] if with_entropy else kept_entropies, temperature, ignore_index, v0)
        return logits

    tiles = _tiles(kept_hidden.shape[0], weight.shape[0], tile_tokens, tile_vocab, budget)
    grad_hidden, grad_weight, grad_bias = _chunked.chunked_linear_backward(
        kept_hidden, weight, bias, tiles, grad_logits, (needs_hidden, needs_weight, needs_bias and bias is not None),
        kept)
    if needs_hidden and rows is not None:
        full = torch.zeros_like(hidden)
        full[rows] = grad_hidden
        grad_hidden = full
    return (grad_hidden if needs_hidden else hidden.new_empty(0), grad_weight if needs_weight else hidden.new_empty(0),
            grad_bias if grad_bias is not None else hidden.new_empty(0))


@register_fake("rlkernels::linear_logprobs_backward")
def _linear_logprobs_backward_fake(grad_logprobs, grad_entropy, hidden, weight, labels, bias, saved, entropies,
                                   temperature, ignore_index, tile_tokens, tile_vocab, budget, backend, needs_hidden,
                                   needs_weight, needs_bias):
    return (hidden.new_empty(hidden.shape if needs_hidden else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,)),
            hidden.new_empty(bias.shape if needs_bias and bias is not None else (0,)))


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, temperature, ignore_index, _with_entropy, _with_top1, tile_tokens, tile_vocab,
     budget, backend) = inputs
    _, entropies, saved, _ = output
    ctx.save_for_backward(hidden, weight, labels, bias, saved, entropies)
    ctx.options = (temperature, ignore_index, tile_tokens, tile_vocab, budget, backend)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_saved, _grad_top1):
    hidden, weight, labels, bias, saved, entropies = ctx.saved_tensors
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
    if not (needs_hidden or needs_weight or needs_bias):
        return (None,) * len(ctx.needs_input_grad)
    N = hidden.shape[0]
    grad_logprobs = (torch.zeros(N, dtype=torch.float32, device=hidden.device) if grad_logprobs is None
                     else grad_logprobs.to(torch.float32).contiguous())
    with_entropy = entropies.shape[0] == N and N > 0 and grad_entropy is not None
    grad_entropy = grad_entropy.to(torch.float32).contiguous() if with_entropy else None
    temperature, ignore_index, tile_tokens, tile_vocab, budget, backend = ctx.options
    if _double_backward.recording():
        def recompute(h, w, b):
            return reference.linear_logprobs(h, w, labels, bias=b, temperature=temperature,
                                             ignore_index=ignore_index, entropy=with_entropy)

        grad_hidden, grad_weight, grad_bias = _double_backward.through_reference(
            recompute, (hidden, weight, bias), (needs_hidden, needs_weight, needs_bias and bias is not None),
            (grad_logprobs, grad_entropy))
        return (grad_hidden, grad_weight, None, grad_bias) + (None,) * (len(ctx.needs_input_grad) - 4)
    # the eager path (_Eager) calls the backward op's body itself, as it did the forward's,
    # with the forward's tiles where it kept them (used once: the backward overwrites them)
    backward_op = torch.ops.rlkernels.linear_logprobs_backward
    if getattr(ctx, "eager", False):
        backward_op = functools.partial(_backward_body, kept=ctx.kept)
        ctx.kept = None
    grad_hidden, grad_weight, grad_bias = backward_op(
        grad_logprobs, grad_entropy, hidden, weight, labels, bias, saved, entropies, temperature, ignore_index,
        tile_tokens, tile_vocab, budget, backend, bool(needs_hidden), bool(needs_weight), bool(needs_bias))
    return (grad_hidden if needs_hidden else None, grad_weight if needs_weight else None, None,
            grad_bias if needs_bias else None) + (None,) * (len(ctx.needs_input_grad) - 4)


torch.library.register_autograd("rlkernels::linear_logprobs", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op in eager mode (_chunked.eager): its body and backward body called directly,
    with the op's own setup_context and backward.  What this skips is torch.library's
    custom-op dispatch and Python autograd wrapper, measured at about 45 us of a 80 us
    forward and 50 us of the backward on tiny inputs; torch.compile, fake tensors,
    functorch transforms and tensor subclasses keep the op."""

    @staticmethod
    def forward(ctx, *inputs):
        kept: list[torch.Tensor] = []
        output = _forward(*inputs, keep=kept)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        # (an intermediate of the op, not an input or output: a ctx attribute)
        ctx.kept = kept or None
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)
