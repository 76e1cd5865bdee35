"""Per-token softmax and KL statistics of one vocabulary shard, and their merge
across shards: float64, in rank order (every rank computes the same bits), or, in the
exact mode, per-chunk statistics folded by the compiled kernel as the unsharded op
folds them (the unsharded op's bits)."""
from __future__ import annotations

import math

import torch

from ... import reference
from ..._library import VOCAB_CHUNK
from ...ops._registry import kernel

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
STAT_WIDTH = 5  # values a token sends per rank
CHUNK_STAT_WIDTH = 4  # values a token sends per chunk in the exact mode (m, s, t, label logit)
# KL's exact mode: kl_vocab_tile's slots (csrc/core/kl_from_logits.h) hold KL_SLOT_WIDTH
# floats, of which a chunk's first KL_CHUNK_STAT_WIDTH (ma, sa, w, mb, sb) travel.
KL_SLOT_WIDTH = 6
KL_CHUNK_STAT_WIDTH = 5


def chunks(columns: int) -> int:
    return -(-columns // VOCAB_CHUNK)


def tile_ops(backend: str):
    return kernel("logprobs_vocab_tile", backend), kernel("logprobs_backward", backend)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs (the reference) keep float64 statistics and results; the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_state(n: int, device, dtype=torch.float32) -> torch.Tensor:
    state = torch.zeros(n, 4, dtype=dtype, device=device)
    state[:, 0] = -math.inf
    return state


def shard_state(logits2d, labels, state, temperature, ignore_index, vocab_start, with_entropy, backend):
    """Merges the [n, width] tile at global column vocab_start into `state` (float32 [n, 4])."""
    if backend == "reference":
        new = reference.logprobs_vocab_tile(logits2d, labels, state, temperature=temperature,
                                            ignore_index=ignore_index, vocab_start=vocab_start,
                                            entropy=with_entropy)
        state.copy_(new)
        return
    tile, _ = tile_ops(backend)
    tile(logits2d, labels, state, temperature, ignore_index, vocab_start, with_entropy, False)


def owned(labels: torch.Tensor, start: int, width: int, dtype=torch.float32) -> torch.Tensor:
    return ((labels >= start) & (labels < start + width)).to(dtype)


def merge_softmax_stats(gathered: torch.Tensor, temperature: float, valid: torch.Tensor):
    """gathered: [ranks, n, 5] (m, s, t, label logit, owned) per shard.  Returns float32
    (log-prob, entropy, saved [n, 2] = (max, ln s)) merged in rank order in float64; a
    valid token whose label no shard owns gets NaN."""
    g = gathered.to(torch.float64)
    scale = _LOG2E / temperature
    m = g[..., 0]
    top = m.amax(0)
    top = torch.where(torch.isnan(m).any(0), torch.nan, top)
    finite = top != -math.inf
    shift = torch.where(finite, top, 0.0)
    dy = torch.where(m == -math.inf, 0.0, (m - shift) * scale)
    c = torch.where(m == -math.inf, 0.0, torch.exp2(dy))
    s = (c * g[..., 1]).sum(0)
    t = (c * (g[..., 2] + dy * g[..., 1])).sum(0)
    label = g[..., 3].sum(0)
    owners = g[..., 4].sum(0)
    log_s = torch.log(s)
    logprob = (label - top) / temperature - log_s
    entropy = log_s - _LN2 * t / s
    logprob = torch.where(owners == 1, logprob, torch.nan)
    logprob = torch.where(valid, logprob, 0.0)
    entropy = torch.where(valid, entropy, 0.0)
    saved = torch.stack([top, log_s], -1)
    out = stat_dtype(gathered.dtype)
    return logprob.to(out), entropy.to(out), saved.to(out)


def exact_chunk_state(n: int, where, device) -> torch.Tensor:
    """float32 [n, chunks(V), 4]: one slot per chunk of the whole vocabulary, the
    logprobs_vocab_tile chunk-state layout (csrc/core/logprobs.h)."""
    return torch.zeros(n, chunks(where.vocab), CHUNK_STAT_WIDTH, device=device)


def fold_exact(where, state, labels, temperature, ignore_index, with_entropy, gather):
    """Every rank's chunks into `state` (this rank's already written), then the fold
    in chunk order by the compiled tile op.  Returns float32 (log-prob, entropy, saved
    [n, 2] = (max, ln s)), the unsharded CPU forward's bits.  One all_gather of
    [n, widest shard's chunks, 4] float32."""
    n = labels.shape[0]
    _gather_chunks(where, state, CHUNK_STAT_WIDTH, gather)
    tile, _ = tile_ops("cpu")
    # a tile of no columns at the vocabulary's end: folds the slots and finishes the rows
    tile(state.new_empty(n, 0), labels, state, temperature, ignore_index, where.vocab, with_entropy, True)
    done = state[:, 0]
    return done[:, 0].clone(), done[:, 1].clone(), done[:, 2:].clone()


def _gather_chunks(where, state, width, gather):
    """Every other rank's chunk slots into `state` [n, chunks(V), slot] (this rank's are
    written): one all_gather of [n, widest shard's chunks, width] float32."""
    n = state.shape[0]
    counts = [chunks(size) for size in where.sizes]
    first = where.vocab_start // VOCAB_CHUNK
    mine = state.new_zeros(n, max(counts), width)
    mine[:, : counts[where.rank]] = state[:, first: first + counts[where.rank], :width]
    gathered = gather(mine)
    for r, (start, count) in enumerate(zip(where.starts, counts)):
        if r != where.rank and count:
            state[:, start // VOCAB_CHUNK: start // VOCAB_CHUNK + count, :width] = gathered[r, :, :count]


def fold_exact_kl(where, a, b, temperature, gather):
    """KL's exact mode: this shard's chunks by kl_vocab_tile, every rank's chunks
    gathered, then the fold and finish by the same op (the unsharded CPU kernel's
    fold_kl_chunk and kl_finish).  a, b: this rank's [n, V_r] rows.  Returns float32 (KL
    [n], saved [n, 5]), the unsharded CPU forward's bits (masked rows aside)."""
    n = a.shape[0]
    if where.vocab == 0:  # no chunk to fold: the unsharded op's empty sum
        return a.new_zeros(n, dtype=torch.float32), a.new_zeros(n, 5, dtype=torch.float32)
    state = torch.zeros(n, chunks(where.vocab), KL_SLOT_WIDTH, device=a.device)
    tile = kernel("kl_vocab_tile", "cpu")
    if a.shape[1]:
        tile(a, b, state, temperature, where.vocab_start, False)
    _gather_chunks(where, state, KL_CHUNK_STAT_WIDTH, gather)
    # a tile of no columns at the vocabulary's end: folds the slots and finishes the rows
    tile(a[:, :0], b[:, :0], state, temperature, where.vocab, True)
    return state[:, 0, 0].clone(), state[:, 0, 1:].clone()


def backward_logits(grad_lp, grad_h, logits2d, labels, saved, entropy, temperature, ignore_index, vocab_start,
                     backend):
    if backend == "reference":
        return reference_backward(grad_lp, grad_h, logits2d, labels, saved, entropy, temperature, ignore_index,
                                   vocab_start)
    _, backward = tile_ops(backend)
    return backward(grad_lp, grad_h, logits2d, labels, saved, entropy, temperature, ignore_index, vocab_start)


def reference_backward(grad_lp, grad_h, x, labels, saved, entropy, temperature, ignore_index, vocab_start):
    z = x.double() / temperature
    logp = z - saved[:, :1].double() / temperature - saved[:, 1:].double()
    p = torch.exp(logp)
    cols = torch.arange(x.shape[-1], device=x.device) + vocab_start
    onehot = (cols[None, :] == labels[:, None]).double()
    g = grad_lp.double()[:, None] * (onehot - p)
    if grad_h is not None:
        g = g - torch.where(p > 0, grad_h.double()[:, None] * p * (logp + entropy.double()[:, None]), 0.0)
    g = torch.where((labels != ignore_index)[:, None], g, 0.0)
    return (g / temperature).to(x.dtype)


def kl_shard_stats(a, b, temperature, backend, mask):
    """(ma, sa, w, mb, sb) float64 [n, 5] of one shard's rows (a: policy, b: reference)."""
    n, width = a.shape
    out = torch.zeros(n, 5, dtype=torch.float64, device=a.device)
    out[:, 0] = -math.inf
    out[:, 3] = -math.inf
    if width == 0:
        return out
    if backend == "reference":
        x, y = a.double(), b.double()
        scale = _LOG2E / temperature
        ma, mb = x.amax(-1), y.amax(-1)
        sha, shb = torch.where(ma == -math.inf, 0.0, ma), torch.where(mb == -math.inf, 0.0, mb)
        ea = torch.exp2((x - sha[:, None]) * scale)
        eb = torch.exp2((y - shb[:, None]) * scale)
        d = ((x - sha[:, None]) - (y - shb[:, None])) / temperature
        ruled = (y == -math.inf) & (x > -math.inf)
        terms = torch.where(ea > 0, ea * d, 0.0)
        w = torch.where(ruled.any(-1), math.inf, terms.sum(-1))
        out = torch.stack([ma, ea.sum(-1), w, mb, eb.sum(-1)], -1)
    else:
        _, saved = kernel("kl_from_logits", backend)(a, b, None, temperature)
        saved = saved.to(torch.float64)
        sa, sb = torch.exp(saved[:, 1]), torch.exp(saved[:, 3])
        w = torch.where(sa > 0, saved[:, 4] * sa, 0.0)
        out = torch.stack([saved[:, 0], sa, w, saved[:, 2], sb], -1)
    if mask is not None:
        out = torch.where(mask[:, None], out, out.new_tensor([-math.inf, 0.0, 0.0, -math.inf, 0.0]))
    return out


def merge_kl_stats(gathered: torch.Tensor, temperature: float):
    """gathered: [ranks, n, 5] per-shard KL statistics; returns (KL float32 [n], saved
    float32 [n, 5] = (ma, ln sa, mb, ln sb, w / sa)) over the whole vocabulary."""
    g = gathered.to(torch.float64)
    scale = _LOG2E / temperature
    ma_r, sa_r, w_r, mb_r, sb_r = g.unbind(-1)

    def top(m):
        best = m.amax(0)
        return torch.where(torch.isnan(m).any(0), torch.nan, best)

    ma, mb = top(ma_r), top(mb_r)
    shift_a, shift_b = torch.where(ma == -math.inf, 0.0, ma), torch.where(mb == -math.inf, 0.0, mb)
    part_a = torch.where(ma_r == -math.inf, 0.0, ma_r)
    part_b = torch.where(mb_r == -math.inf, 0.0, mb_r)
    ca = torch.where(sa_r != 0, torch.exp2((ma_r - ma) * scale), 0.0)
    cb = torch.where(sb_r != 0, torch.exp2((mb_r - mb) * scale), 0.0)
    moved = ((part_a - shift_a) - (part_b - shift_b)) / temperature
    sa = (ca * sa_r).sum(0)
    w_terms = torch.where(w_r == math.inf, math.inf, torch.where(sa_r != 0, ca * (w_r + sa_r * moved), 0.0))
    w = w_terms.sum(0)
    sb = (cb * sb_r).sum(0)
    log_sa, log_sb = torch.log(sa), torch.log(sb)
    mean_ratio = w / sa
    kl = mean_ratio - log_sa + log_sb
    saved = torch.stack([ma, log_sa, mb, log_sb, mean_ratio], -1)
    out = stat_dtype(gathered.dtype)
    return kl.to(out), saved.to(out)


def klreference_backward(g, a, b, mask, saved, temperature):
    x, y, s = a.double(), b.double(), saved.double()
    log_p = (x - s[:, :1]) / temperature - s[:, 1:2]
    log_q = (y - s[:, 2:3]) / temperature - s[:, 3:4]
    p, q = torch.exp(log_p), torch.exp(log_q)
    d = ((x - torch.where(s[:, :1] == -math.inf, 0.0, s[:, :1]))
         - (y - torch.where(s[:, 2:3] == -math.inf, 0.0, s[:, 2:3]))) / temperature
    ga = torch.where(p > 0, g.double()[:, None] * p * (d - s[:, 4:5]) / temperature, 0.0)
    gb = g.double()[:, None] * (q - p) / temperature
    if mask is not None:
        ga, gb = torch.where(mask[:, None], ga, 0.0), torch.where(mask[:, None], gb, 0.0)
    return ga.to(a.dtype), gb.to(b.dtype)


