"""rlkernels.linear_logprobs: per-token log-probs (and entropy) straight from
hidden states and the lm-head, never holding more than one tile of logits.

Forward: for each tile of [tokens, vocabulary block], logits = hidden @ weight.T
(+ bias) into one reused buffer, then the fused tile kernel, which merges the
tile into each token's running softmax statistics and, at the row's last block,
writes its log-prob, entropy and the row statistics the backward keeps (8 bytes
a token).  Backward: the same tiles recomputed, turned into d loss / d logits in
place by the fused backward kernel, and fed to the matmuls for hidden, weight
and bias.  Rows whose label is ignore_index are dropped before any matmul."""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op, register_fake

from .. import _validate as V, reference
from . import _chunked
from . import _logits as L

_OP = "linear_logprobs"


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                    entropy: bool = False, chunk_size: int | tuple[int, int] | None = None,
                    backend: str = "auto"):
    """log softmax((hidden @ weight.T + bias) / temperature)[label] per token, without
    materialising the [N, V] logits.

    hidden: `[..., H]`; weight: the lm-head `[V, H]` of hidden's dtype (float32, bfloat16,
    float16; float64 runs on the reference); bias: `[V]` or None; labels: int of hidden's
    leading shape, in [0, V) or ignore_index.  chunk_size: the logits held at a time, as
    a number of full rows (default: as many as 64 MiB of float32 logits hold); peak extra
    memory is about chunk_size x V logits, spent on tiles of vocabulary blocks (4096
    wide) times tokens, forward and backward; or a (tokens, vocabulary) pair fixing the
    tile.  Returns float32 log-probs (and entropy with entropy=True) of the leading
    shape, 0 on ignored tokens; gradients flow to hidden, weight and bias.
    """
    V.tensor(_OP, "hidden", hidden, dtypes=L.LOGIT_DTYPES, min_ndim=1)
    V.tensor(_OP, "weight", weight, dtypes=L.LOGIT_DTYPES, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{_OP}: weight must have shape [V, {hidden.shape[-1]}] (hidden size last), "
                         f"got {tuple(weight.shape)}")
    V.same_dtype(_OP, "weight", weight, "hidden", hidden)
    if bias is not None:
        V.tensor(_OP, "bias", bias, dtypes=L.LOGIT_DTYPES, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{_OP}: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        V.same_dtype(_OP, "bias", bias, "hidden", hidden)
    device = V.same_device(_OP, hidden=hidden, weight=weight, bias=bias)
    ignore_index = L.index(_OP, "ignore_index", ignore_index)
    labels = L.labels_for(_OP, labels, hidden, ignore_index, vocab=weight.shape[0], logits_name="hidden")
    temperature = L.temperature(_OP, temperature)
    entropy = bool(entropy)
    N = labels.numel()
    tile_tokens, tile_vocab, budget = _tiling(chunk_size, N, weight.shape[0])  # checked on every backend
    chosen = L.choose_backend(_OP, backend, device, hidden.dtype)
    if chosen == "reference":
        return reference.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, entropy=entropy)
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    values, entropies, _ = torch.ops.rlkernels.linear_logprobs(flat_hidden, weight, flat_labels, bias, temperature,
                                                               ignore_index, entropy, tile_tokens, tile_vocab, budget,
                                                               chosen)
    values = values.reshape(lead)
    return (values, entropies.reshape(lead)) if entropy else values


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


def _tiles(n: int, vocab: int, tile_tokens: int, tile_vocab: int, budget: int) -> tuple[int, int]:
    tokens, block = _chunked.lm_head_tiles(n, vocab, budget)
    return tile_tokens or tokens, tile_vocab or block


def _row_ops(backend: str):
    if backend == "triton":
        return torch.ops.rlkernels.logprobs_vocab_tile_triton, torch.ops.rlkernels.logprobs_backward_inplace_triton
    return torch.ops.rlkernels.logprobs_vocab_tile, torch.ops.rlkernels.logprobs_backward_inplace


@custom_op("rlkernels::linear_logprobs", mutates_args=())
def _linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                     temperature: float, ignore_index: int, with_entropy: bool, tile_tokens: int, tile_vocab: int,
                     budget: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab_tile, _ = _row_ops(backend)
    N, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    values = torch.zeros(N, **f32)
    entropies = torch.zeros(N if with_entropy else 0, **f32)
    saved = torch.zeros(N, 2, **f32)
    rows = _chunked.kept_rows(labels, ignore_index)
    kept_hidden, kept_labels = (hidden, labels) if rows is None else (hidden[rows], labels[rows])
    n = kept_hidden.shape[0]
    if n == 0:
        return values, entropies, saved
    # per kept token: running (max, sum, entropy sum, label logit), then (log p, H, max, ln s)
    state = torch.empty(n, 4, **f32)
    tiles = _tiles(n, vocab, tile_tokens, tile_vocab, budget)
    for t0, t1, v0, v1, logits in _chunked.tiled_logits(kept_hidden, weight, bias, tiles):
        vocab_tile(logits, kept_labels[t0:t1], state[t0:t1], temperature, ignore_index, v0, with_entropy, v1 == vocab)
    span = slice(None) if rows is None else rows
    values[span] = state[:, 0]
    saved[span] = state[:, 2:]
    if with_entropy:
        entropies[span] = state[:, 1]
    return values, entropies, saved


@register_fake("rlkernels::linear_logprobs")
def _linear_logprobs_fake(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, tile_tokens,
                          tile_vocab, budget, backend):
    N = hidden.shape[0]
    return (hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N if with_entropy else 0, dtype=torch.float32),
            hidden.new_empty((N, 2), dtype=torch.float32))


@custom_op("rlkernels::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                              hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              bias: Optional[torch.Tensor], saved: torch.Tensor, entropies: torch.Tensor,
                              temperature: float, ignore_index: int, tile_tokens: int, tile_vocab: int, budget: int,
                              backend: str, needs_hidden: bool, needs_weight: bool,
                              needs_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        kept_hidden, weight, bias, tiles, grad_logits, (needs_hidden, needs_weight, needs_bias and bias is not None))
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
    (hidden, weight, labels, bias, temperature, ignore_index, with_entropy, tile_tokens, tile_vocab, budget,
     backend) = inputs
    _, entropies, saved = output
    ctx.save_for_backward(hidden, weight, labels, bias, saved, entropies)
    ctx.options = (temperature, ignore_index, tile_tokens, tile_vocab, budget, backend)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_saved):
    hidden, weight, labels, bias, saved, entropies = ctx.saved_tensors
    needs_hidden, needs_weight, _, needs_bias = ctx.needs_input_grad[:4]
    if not (needs_hidden or needs_weight or needs_bias):
        return (None,) * 11
    N = hidden.shape[0]
    grad_logprobs = (torch.zeros(N, dtype=torch.float32, device=hidden.device) if grad_logprobs is None
                     else grad_logprobs.to(torch.float32).contiguous())
    with_entropy = entropies.shape[0] == N and N > 0 and grad_entropy is not None
    grad_entropy = grad_entropy.to(torch.float32).contiguous() if with_entropy else None
    temperature, ignore_index, tile_tokens, tile_vocab, budget, backend = ctx.options
    grad_hidden, grad_weight, grad_bias = torch.ops.rlkernels.linear_logprobs_backward(
        grad_logprobs, grad_entropy, hidden, weight, labels, bias, saved, entropies, temperature, ignore_index,
        tile_tokens, tile_vocab, budget, backend, bool(needs_hidden), bool(needs_weight), bool(needs_bias))
    return (grad_hidden if needs_hidden else None, grad_weight if needs_weight else None, None,
            grad_bias if needs_bias else None) + (None,) * 7


torch.library.register_autograd("rlkernels::linear_logprobs", _backward, setup_context=_setup_context)
