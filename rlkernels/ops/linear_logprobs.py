"""rlkernels.linear_logprobs: per-token log-probs (and entropy) straight from
hidden states and the lm-head, holding at most chunk_size x V logits at a time.
Optionally also two row statistics TRL's fused lm-head reports: the mean logit
over the vocabulary and whether the label is the arg-max.

The op rlkernels::linear_logprobs, its backward op and its autograd are C++
(csrc/lm_head/linear_logprobs.cpp, csrc/autograd/linear_logprobs.cpp; the tile rules in
csrc/core/lm_head.h) for every backend: the body calls the compiled tile kernels, or
their Triton twins for backend="triton", through the dispatcher.  This module holds the
public function (argument checks, backend choice, mean_logits), the fake kernels and
the recorded double backward.

Forward: for each tile of [tokens, vocabulary block], logits = hidden @ weight.T
(+ bias) into one reused buffer, then the fused tile kernel, which merges the
tile into each token's running softmax statistics and, at the row's last block,
writes its log-prob, entropy and the row statistics the backward keeps (8 bytes
a token).  Backward: the same tiles recomputed, turned into d loss / d logits in
place by the fused backward kernel, and fed to the matmuls for hidden, weight
and bias.  When all the tiles fit that budget at once (small problems, the
default tile size, plain eager tensors), the forward keeps them for the backward
instead of reusing one buffer, and the backward skips the recomputation (three
matmuls instead of four; lm_head::keeps_tiles).  Rows whose label is ignore_index
are dropped before any matmul, except on CUDA outside the checked mode (finding them
would be a host sync): there they go through the matmuls and the kernels give them 0
and no gradient.  The op's pass that finds them also checks the label range, so the
front end does not read the labels a second time.

The mean logit needs no pass over the logits: the mean over the vocabulary of
hidden @ weight.T + bias is hidden @ mean(weight) + mean(bias), one [V, H]
column mean (accumulated in float64) and a matrix-vector product in float32.
Whether the label is the arg-max comes from the tile kernel, which tracks it in a
fifth state value per row (csrc/core/logprobs.h)."""
from __future__ import annotations

import torch

from .. import _checkmode, reference
from .._library import _C
from . import _chunked, _double_backward
from . import _logits as L

__all__ = ["linear_logprobs"]

_OP = "linear_logprobs"
_FORWARD = torch.ops.rlkernels.linear_logprobs.default


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
    if group is None and not torch.compiler.is_compiling():
        # The usual call, checked and run in one compiled call (csrc/usual_calls.cpp); None
        # where any argument is of another kind, which the checks below handle.
        done = _C.linear_logprobs_usual(_chunked.CHUNK_BYTES, hidden, weight, labels, bias, temperature, ignore_index,
                                        entropy, mean_logits, is_top1, chunk_size, backend)
        if done is not None:
            return done
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
    # (the label range: checked by the op where it reads the labels to drop ignored rows)
    labels = L.labels_for(_OP, labels, hidden, ignore_index, logits_name="hidden", check_range=False)
    temperature = L.temperature(_OP, temperature)
    entropy, mean_logits, is_top1 = bool(entropy), bool(mean_logits), bool(is_top1)
    N = labels.numel()
    tile_tokens, tile_vocab, budget = _tiling(chunk_size, N, weight.shape[0])  # checked on every backend
    chosen = L.choose_backend(_OP, backend, device, hidden.dtype)
    if chosen == "reference":
        L.label_range(_OP, labels, weight.shape[0], ignore_index)
        return reference.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, entropy=entropy, mean_logits=mean_logits,
                                         is_top1=is_top1)
    # the op (C++, csrc/lm_head/ and csrc/autograd/linear_logprobs.cpp) takes hidden [..., H]
    # and labels [...] as they are, and drops ignored rows where it may read the labels
    values, entropies, _, top1 = _FORWARD(hidden, weight, labels, bias, temperature, ignore_index, entropy, is_top1,
                                          tile_tokens, tile_vocab, budget, _checkmode.reads_data(labels), chosen)
    if not (entropy or mean_logits or is_top1):
        return values
    outputs = [values]
    if entropy:
        outputs.append(entropies)
    if mean_logits:
        flat_labels = labels.reshape(-1)
        means = mean_logit(hidden.reshape(N, hidden.shape[-1]), weight, bias, temperature, flat_labels != ignore_index)
        outputs.append(means.reshape(labels.shape))
    if is_top1:
        outputs.append(top1)
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


@torch.library.register_fake("rlkernels::linear_logprobs")
def _linear_logprobs_fake(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1,
                          tile_tokens, tile_vocab, budget, drop_ignored, backend):
    lead = labels.shape
    return (hidden.new_empty(lead, dtype=torch.float32),
            hidden.new_empty(lead if with_entropy else (0,), dtype=torch.float32),
            hidden.new_empty((labels.numel(), 2), dtype=torch.float32),
            hidden.new_empty(lead if with_top1 else (0,), dtype=torch.bool))


@torch.library.register_fake("rlkernels::linear_logprobs_backward")
def _linear_logprobs_backward_fake(grad_logprobs, grad_entropy, hidden, weight, labels, bias, saved, entropies,
                                   temperature, ignore_index, tile_tokens, tile_vocab, budget, drop_ignored, backend,
                                   needs_hidden, needs_weight, needs_bias):
    return (hidden.new_empty(hidden.shape if needs_hidden else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,)),
            hidden.new_empty(bias.shape if needs_bias and bias is not None else (0,)))


@_double_backward.recorded("linear_logprobs")
def _recorded_backward(grad_logprobs, grad_entropy, hidden, weight, labels, bias, temperature, ignore_index,
                       with_entropy, needs_hidden, needs_weight, needs_bias):
    """The backward inside a recorded backward (create_graph=True), from the C++ autograd
    (csrc/autograd/linear_logprobs.cpp): (grad hidden, grad weight, grad bias) through the
    reference, differentiable."""
    def recompute(h, w, b):
        return reference.linear_logprobs(h, w, labels, bias=b, temperature=temperature, ignore_index=ignore_index,
                                         entropy=with_entropy)

    return _double_backward.through_reference(
        recompute, (hidden, weight, bias), (needs_hidden, needs_weight, needs_bias and bias is not None),
        (grad_logprobs, grad_entropy))
