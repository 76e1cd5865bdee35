"""Chunked lm-head: the logits ``hidden @ weight.T (+ bias)`` exist one tile at a
time, so extra memory is bounded by the tile instead of O(N x V).

The matmuls go to the platform's BLAS (torch.mm on tiles, cuBLAS on GPU) and
write into one reused buffer; what happens to each tile is the caller's: one
that carries per-row statistics across the vocabulary blocks of a row
(tiled_logits: the vocabulary-parallel forward), and one that turns a tile into
d loss / d logits in place (backward).

Backward tiling: vocabulary blocks outside, token chunks inside.  Each weight
row block then gets its gradient from whole token chunks, in one matmul when the
token chunk is all tokens (the default whenever the tile fits): no running sum
over chunks of a [V, H] gradient, which in 16 bits would round once per chunk
and in float32 would cost twice the weight's memory.  The hidden gradient [N, H]
(usually much smaller than [V, H]) accumulates over vocabulary blocks, in float32
for 16-bit inputs, and is rounded once.

linear_logprobs and linear_ppo_loss do the same in C++ (csrc/lm_head/: the same tiles,
order and row padding, so their logits are these functions' bit for bit); the
vocabulary-parallel ops use these:

    tiles = lm_head_tiles(N, V, budget)
    for t0, t1, v0, v1, logits in tiled_logits(hidden, weight, bias, tiles):
        ...merge the [t1 - t0, v1 - v0] tile into per-token running statistics...
    grads = chunked_linear_backward(hidden, weight, bias, tiles, grad_logits_fn, needs)

where grad_logits_fn(t0, t1, v0, v1, logits) returns d loss / d logits for tokens
[t0, t1) and vocabulary entries [v0, v1) (it may overwrite and return `logits`;
rlkernels.ops.logprobs' backward ops take `vocab_start=v0` for exactly this).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .. import _checkmode
from .._library import BUILD_INFO, VOCAB_CHUNK, _C

# The tile rules and their constants are C++ (csrc/core/lm_head.h), written once for the
# C++ op bodies and these helpers.
# Default budget for one tile of logits, counted in float32.
CHUNK_BYTES = int(BUILD_INFO.get("chunk_bytes", 64 << 20))
# Vocabulary block of the lm-head tiles (linear_logprobs' forward and backward).  Fixed,
# not sized from the batch: a token's logits then come from the same matmul shapes, and
# its row statistics merge tile by tile in the same order, whatever the batch (and the
# backward recomputes the forward's logits bit for bit).  A multiple of the vocabulary
# chunk (kVocabChunk, core/logprobs.h), so the tiles fold the whole-row pass's chunks
# exactly (and vocabulary-parallel shards on chunk edges tile alike).  Vocabulary tiles
# over all tokens also beat token chunks over the whole vocabulary on the CPU: MKL
# repacks the whole weight for every chunk (figures in docs).
VOCAB_BLOCK = int(BUILD_INFO.get("vocab_block", VOCAB_CHUNK))
# Row granularity of the lm-head matmuls.  A BLAS picks its code path, and so the
# summation order, by the row count: with MKL the rows of a 1-3 row float32 matmul (or of
# a thread's 1-3 row share of a larger one) round differently from the same rows in a
# larger matmul.  Every lm-head matmul (forward chunks, backward tiles, linear_ppo_loss)
# therefore runs on a multiple of GEMM_ROWS rows, which gives each token the same logits,
# bit for bit, whatever the batch it is in (measured on MKL, 1-16 threads;
# docs/numerics.md).
GEMM_ROWS = int(BUILD_INFO.get("gemm_rows", 16))


def chunk_rows(n: int, vocab: int, chunk_size: int | None = None, budget: int = CHUNK_BYTES) -> int:
    """Rows per forward chunk: `chunk_size` when given, else as many as fit `budget`
    bytes of float32 logits, balanced so that the last chunk is not a sliver, and then
    rounded down to a multiple of GEMM_ROWS: only the last chunk's matmul needs a padded
    tail (row_logits).  (lm_head::chunk_rows, csrc/core/lm_head.h.)"""
    return _C.chunk_rows(n, vocab, 0 if chunk_size is None else max(1, int(chunk_size)), budget)


def lm_head_tiles(n: int, vocab: int, budget: int = CHUNK_BYTES) -> tuple[int, int]:
    """(token chunk, vocabulary block) of the lm-head tiles within `budget` bytes of
    float32: blocks of VOCAB_BLOCK (or the whole vocabulary when smaller), and as many
    tokens as fit, all of them when they do.  (lm_head::tiles, csrc/core/lm_head.h.)"""
    return tuple(_C.lm_head_tiles(n, vocab, budget))


def _threads(a: torch.Tensor, b: torch.Tensor):
    """A `with` block in which the CPU matmul a @ b runs on as many threads as its work is
    worth, on the calling thread (csrc/lm_head/gemm.h, as the C++ bodies' matmuls)."""
    if _C is None or a.device.type != "cpu" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _C.GemmThreadsScope(a, a.shape[0], b.shape[1], a.shape[1])


def _logits_into(buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    with _threads(hidden, weight.t()):
        if bias is None:
            return torch.mm(hidden, weight.t(), out=buffer)
        return torch.addmm(bias, hidden, weight.t(), out=buffer)


def padded_rows(n: int) -> int:
    """n rounded up to a multiple of GEMM_ROWS: the rows a logits buffer for n tokens needs."""
    return -(-n // GEMM_ROWS) * GEMM_ROWS


def row_logits(buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ weight.T (+ bias) for hidden's n rows into `buffer` (padded_rows(n) rows
    or more); returns the view of the n rows.  The rows go through matmuls over multiples
    of GEMM_ROWS rows: the largest such prefix in place, the remaining n % GEMM_ROWS rows
    copied into GEMM_ROWS zero rows.  Each row's logits are then the same bits whatever
    the number of rows."""
    n = hidden.shape[0]
    whole = n - n % GEMM_ROWS
    if whole:
        _logits_into(buffer[:whole], hidden[:whole], weight, bias)
    if whole < n:
        staged = hidden.new_zeros((GEMM_ROWS, hidden.shape[1]))
        staged[: n - whole] = hidden[whole:]
        _logits_into(buffer[whole: whole + GEMM_ROWS], staged, weight, bias)
    return buffer[:n]


def tiled_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 tiles: tuple[int, int]) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """Yields (t0, t1, v0, v1, logits) with logits = hidden[t0:t1] @ weight[v0:v1].T (+ bias):
    token chunks outside, vocabulary blocks inside (in order), each tile a view of one
    buffer that the next tile overwrites.  The backward's tiles hold the same bits."""
    chunk, block = tiles
    n, vocab = hidden.shape[0], weight.shape[0]
    if n == 0 or vocab == 0:
        return
    buffer = hidden.new_empty(padded_rows(min(chunk, n)) * min(block, vocab))
    for t0 in range(0, n, chunk):
        t1 = min(t0 + chunk, n)
        rows = padded_rows(t1 - t0)
        for v0 in range(0, vocab, block):
            v1 = min(v0 + block, vocab)
            tile = buffer[: rows * (v1 - v0)].view(rows, v1 - v0)
            yield t0, t1, v0, v1, row_logits(tile, hidden[t0:t1], weight[v0:v1],
                                             bias[v0:v1] if bias is not None else None)


def chunked_linear_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            tiles: tuple[int, int],
                            grad_logits: Callable[[int, int, int, int, torch.Tensor], torch.Tensor],
                            needs: tuple[bool, bool, bool] = (True, True, True)):
    """Recomputes the logits tile by tile, asks grad_logits(t0, t1, v0, v1, logits) for
    d loss / d logits of each tile, and returns (grad_hidden, grad_weight, grad_bias)
    (None where `needs` is False)."""
    needs_hidden, needs_weight, needs_bias = needs
    chunk, block = tiles
    n, vocab = hidden.shape[0], weight.shape[0]
    narrow = hidden.dtype in (torch.float16, torch.bfloat16)
    wide = torch.float32 if narrow else hidden.dtype
    grad_hidden = torch.zeros(hidden.shape, dtype=wide, device=hidden.device) if needs_hidden else None
    grad_weight = (torch.empty_like(weight) if n > 0 else torch.zeros_like(weight)) if needs_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if needs_bias else None
    whole = chunk >= n  # each weight block's gradient in one matmul
    block_sum = None
    if needs_weight and not whole:
        block_sum = torch.empty((min(block, vocab), weight.shape[1]), dtype=wide, device=weight.device)
    buffer = hidden.new_empty(padded_rows(min(chunk, n)) * min(block, vocab)) if n > 0 else None
    for v0 in range(0, vocab if n > 0 else 0, block):
        v1 = min(v0 + block, vocab)
        weight_block = weight[v0:v1]
        bias_block = bias[v0:v1] if bias is not None else None
        if block_sum is not None:
            block_sum.zero_()
        for t0 in range(0, n, chunk):
            t1 = min(t0 + chunk, n)
            # the forward's logits, bit for bit when the tiles are the forward's (tiled_logits):
            # the saved row statistics then describe exactly these logits
            rows = padded_rows(t1 - t0)
            tile = row_logits(buffer[: rows * (v1 - v0)].view(rows, v1 - v0), hidden[t0:t1], weight_block,
                              bias_block)
            dlogits = grad_logits(t0, t1, v0, v1, tile)
            if needs_hidden:
                with _threads(dlogits, weight_block):
                    if narrow:
                        grad_hidden[t0:t1].add_(torch.mm(dlogits, weight_block))
                    else:
                        grad_hidden[t0:t1].addmm_(dlogits, weight_block)
            if needs_weight:
                with _threads(dlogits.t(), hidden[t0:t1]):
                    if whole:
                        torch.mm(dlogits.t(), hidden[t0:t1], out=grad_weight[v0:v1])
                    elif narrow:
                        block_sum[: v1 - v0].add_(torch.mm(dlogits.t(), hidden[t0:t1]))
                    else:
                        block_sum[: v1 - v0].addmm_(dlogits.t(), hidden[t0:t1])
            if needs_bias:
                grad_bias[v0:v1].add_(dlogits.sum(0, dtype=torch.float32))
        if block_sum is not None:
            grad_weight[v0:v1].copy_(block_sum[: v1 - v0])
    if needs_hidden and narrow:
        grad_hidden = grad_hidden.to(hidden.dtype)
    if needs_bias and bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def kept_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows whose label is not ignore_index, or None when all are kept:
    ignored rows (prompt, padding) need no logits at all (the vocabulary-parallel ops;
    linear_logprobs' C++ body has its own, kept_rows in csrc/lm_head/linear_logprobs.cpp).  Finding them reads the
    labels on the host, so on CUDA outside the checked mode every row is kept (None):
    the row kernels give ignored rows 0 and no gradient, at the cost of their matmuls."""
    if not _checkmode.reads_data(labels):
        return None
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)
