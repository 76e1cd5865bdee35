"""Token-chunked lm-head: the logits ``hidden @ weight.T (+ bias)`` exist one
chunk of tokens at a time, so extra memory is O(chunk x V) instead of O(N x V).

The matmuls go to the platform's BLAS (torch.mm on chunks, cuBLAS on GPU) and
write into one reused buffer; what happens to each chunk's logits is the
caller's: a fused row kernel that reduces them (forward), and one that turns
them into d loss / d logits in place (backward).  linear_logprobs is built on
these functions; other fused losses over the lm-head (e.g. a PPO loss from
hidden states) reuse them as they are:

    for start, stop, logits in chunked_logits(hidden, weight, bias, chunk):
        ...reduce logits (a [stop - start, V] view) to per-token values...
    grads = chunked_linear_backward(hidden, weight, bias, chunk, grad_logits_fn, needs)

where grad_logits_fn(start, stop, logits) returns d loss / d logits for the chunk
(it may overwrite and return `logits`).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

# Default budget for one chunk of float32 logits.
CHUNK_BYTES = 64 << 20


def chunk_rows(n: int, vocab: int, chunk_size: int | None = None, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: `chunk_size` when given, else as many as fit `budget` bytes of
    float32 logits, balanced so that the last chunk is not a sliver."""
    if n <= 0:
        return 1
    if chunk_size is None:
        chunk_size = max(1, budget // (4 * max(vocab, 1)))
    chunk_size = max(1, min(int(chunk_size), n))
    count = -(-n // chunk_size)
    return -(-n // count)


def _chunk_logits_into(buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return torch.mm(hidden, weight.t(), out=buffer)
    return torch.addmm(bias, hidden, weight.t(), out=buffer)


def chunked_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (start, stop, logits) with logits = hidden[start:stop] @ weight.T (+ bias),
    a view of one buffer that the next chunk overwrites."""
    n, vocab = hidden.shape[0], weight.shape[0]
    if n == 0:
        return
    buffer = hidden.new_empty((min(chunk, n), vocab))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        yield start, stop, _chunk_logits_into(buffer[: stop - start], hidden[start:stop], weight, bias)


def chunked_linear_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int,
                            grad_logits: Callable[[int, int, torch.Tensor], torch.Tensor],
                            needs: tuple[bool, bool, bool] = (True, True, True)):
    """Recomputes each chunk's logits, asks grad_logits(start, stop, logits) for d loss /
    d logits, and returns (grad_hidden, grad_weight, grad_bias) (None where `needs` is
    False).  Gradients of 16-bit weights accumulate over chunks in float32 and are
    rounded once, as a single unchunked matmul would."""
    needs_hidden, needs_weight, needs_bias = needs
    wide = weight.dtype in (torch.float16, torch.bfloat16)
    grad_hidden = torch.empty_like(hidden) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if wide else weight.dtype,
                              device=weight.device) if needs_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs_bias else None
    for start, stop, logits in chunked_logits(hidden, weight, bias, chunk):
        dlogits = grad_logits(start, stop, logits)
        if needs_hidden:
            torch.mm(dlogits, weight, out=grad_hidden[start:stop])
        if needs_weight:
            if wide:
                grad_weight.add_(torch.mm(dlogits.t(), hidden[start:stop]))
            else:
                grad_weight.addmm_(dlogits.t(), hidden[start:stop])
        if needs_bias:
            grad_bias.add_(dlogits.sum(0, dtype=torch.float32))
    if needs_weight and wide:
        grad_weight = grad_weight.to(weight.dtype)
    if needs_bias and bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def kept_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows whose label is not ignore_index, or None when all are kept:
    ignored rows (prompt, padding) need no logits at all."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)
