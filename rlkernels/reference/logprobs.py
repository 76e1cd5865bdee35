"""Log-probs, entropy and KL written the way RL frameworks write them: a full
`log_softmax` over the vocabulary, then `gather`.  Differentiable with torch
autograd; accumulates in float32 (float64 stays float64).  The truth for tests,
the baseline for benchmarks and the `backend="reference"` path."""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype

__all__ = ["logprobs", "logprobs_per_row", "logprobs_vocab_tile", "linear_logprobs"]


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    # p log p -> 0 where p underflows (also where log p = -inf), with a zero gradient there
    return -(p * logp.masked_fill(p == 0, 0)).sum(-1)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature after shifting each row by its maximum: the same softmax (the
    shift is a constant to autograd, and softmax ignores constants, to every order), but
    x / T no longer overflows to inf (then NaN) at tiny temperatures."""
    if logits.shape[-1] == 0:
        return logits / temperature
    top = logits.detach().amax(-1, keepdim=True)
    return (logits - torch.where(torch.isfinite(top), top, 0)) / temperature


def logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
             entropy: bool = False):
    """log softmax(logits / temperature)[label] per token (0 where labels == ignore_index);
    with entropy=True also H = -sum_j p_j log p_j (0 on ignored tokens)."""
    valid = labels != ignore_index
    # ignored rows may hold anything (NaN padding): keep it out of values and gradients
    logits = torch.where(valid.unsqueeze(-1), logits, 0).to(acc_dtype(logits.dtype))
    if logits.shape[-1] == 0:  # no vocabulary: every label is ignored (validated), all values are 0
        picked = logits.sum(-1)
        return (picked, picked.clone()) if entropy else picked
    logp = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    picked = torch.where(valid, picked, 0)
    if not entropy:
        return picked
    return picked, torch.where(valid, _entropy(logp), 0)


def logprobs_per_row(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                     ignore_index: int = -100, entropy: bool = False):
    """The memory-saving loop TRL (selective_log_softmax) and verl use: one step per
    slice of the first dimension (a sequence of a [B, T, V] batch), so only that
    slice's log-softmax is materialised.  As in TRL, float32/float64 take logsumexp and
    16-bit logits a log_softmax in their own dtype; the result has the logits' dtype."""
    picked, entropies = [], []
    for row_logits, row_labels in zip(logits, labels):
        valid = row_labels != ignore_index
        safe = torch.where(valid, row_labels, 0).long().unsqueeze(-1)
        scaled = row_logits / temperature if temperature != 1.0 else row_logits
        if row_logits.dtype in (torch.float32, torch.float64) and not entropy:
            row = scaled.gather(-1, safe).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
        else:
            row_logp = torch.log_softmax(scaled, dim=-1)
            row = row_logp.gather(-1, safe).squeeze(-1)
            if entropy:
                entropies.append(torch.where(valid, _entropy(row_logp), 0))
        picked.append(torch.where(valid, row, 0))
    if not picked:
        empty = logits.new_empty(labels.shape)
        return (empty, empty.clone()) if entropy else empty
    out = torch.stack(picked)
    return (out, torch.stack(entropies)) if entropy else out


def logprobs_vocab_tile(logits: torch.Tensor, labels: torch.Tensor, state: torch.Tensor, *, temperature: float = 1.0,
                        ignore_index: int = -100, vocab_start: int = 0, entropy: bool = True,
                        finish: bool = False) -> torch.Tensor:
    """The state (float64 [N, 4]) that the tile op leaves after merging `logits`, the
    columns [vocab_start, vocab_start + V') of the rows, into `state` (ignored when
    vocab_start == 0): (m, s, t, label logit) with s = sum 2^y, t = sum y 2^y and
    y = (x - m) log2(e) / T, or after the last tile (finish) (log p, H, m, ln s).
    A state of 5 values per row adds the arg-max flag: 1 while the label is the first
    arg-max of the columns seen so far.  Ignored rows hold zeros; without entropy t and
    H are 0.  Does not modify `state`."""
    x = logits.double().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    n, width = x.shape
    top1 = n > 0 and state.numel() == 5 * n
    scale = 1.4426950408889634 / temperature
    old = torch.zeros(n, 5 if top1 else 4, dtype=torch.float64, device=x.device)
    old[:, 0] = -torch.inf
    if vocab_start != 0:
        old = state.reshape(n, -1).double()
    m0, s0, t0, label0 = old[:, :4].unbind(-1)
    tile_max = x.amax(-1) if width else torch.full((n,), -torch.inf, dtype=torch.float64, device=x.device)
    m = torch.maximum(m0, tile_max)
    shift = torch.where(m == -torch.inf, 0.0, m)
    y = (x - shift[:, None]) * scale
    e = torch.exp2(y)
    dy0 = torch.where(m0 == -torch.inf, 0.0, (m0 - shift) * scale)
    c0 = torch.where(m0 == -torch.inf, 0.0, torch.exp2(dy0))
    s = c0 * s0 + e.sum(-1)
    t = c0 * (t0 + dy0 * s0) + torch.where(e > 0, e * y, 0.0).sum(-1)
    local = labels - vocab_start
    inside = (local >= 0) & (local < width)
    picked = x.gather(-1, local.clamp(0, max(width - 1, 0))[:, None])[:, 0] if width else label0
    x_label = torch.where(inside, picked, label0)
    if not entropy:
        t = torch.zeros_like(t)
    if finish:
        log_s = torch.log(s)
        out = torch.stack([(x_label - m) / temperature - log_s,
                           log_s - 0.6931471805599453 * t / s if entropy else torch.zeros_like(s), m, log_s], -1)
    else:
        out = torch.stack([m, s, t, x_label], -1)
    if top1:
        # first arg-max of the columns so far: nothing before the label reaches its logit, nothing after exceeds it
        cols = torch.arange(width, device=x.device)
        earlier = ((x >= x_label[:, None]) & (cols[None, :] < local[:, None])).any(-1)
        top = (x_label >= m) & torch.where(inside, (m0 < x_label) & ~earlier, old[:, 4] != 0)
        out = torch.cat([out, top.double()[:, None]], -1)
    return torch.where((labels == ignore_index)[:, None], 0.0, out)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                    entropy: bool = False, mean_logits: bool = False, is_top1: bool = False):
    """The unfused lm-head: logits = hidden @ weight.T (+ bias), then logprobs.  Ignored
    tokens' hidden states may hold anything (NaN padding): they are zeroed first, so they
    reach neither the values nor the weight's gradient.  mean_logits: the mean of the
    logits / temperature over the vocabulary (no gradient); is_top1: argmax == label (the
    first maximum wins a tie), False where a row holds NaN; both 0 / False on ignored
    tokens.  Returns the log-probs, then entropy, mean_logits and is_top1 as asked."""
    valid = labels != ignore_index
    hidden = torch.where(valid.unsqueeze(-1), hidden, 0)
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    out = logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, entropy=entropy)
    if not (mean_logits or is_top1):
        return out
    out = list(out) if entropy else [out]
    if mean_logits:
        with torch.no_grad():
            means = logits.to(acc_dtype(logits.dtype)).mean(-1) / temperature
        out.append(torch.where(valid, means, 0).to(out[0].dtype))
    if is_top1:
        top = (logits.argmax(-1) == labels) & ~logits.isnan().any(-1)
        out.append(top & valid)
    return tuple(out)
