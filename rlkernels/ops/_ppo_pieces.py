"""How linear_ppo_loss cuts the [B, T] token grid into pieces, and how each piece's
share of the loss is normalised.

Each piece goes through the policy op on its own, so the batch's normalisers (valid
tokens n_t, sequences with a valid token n_s, T_norm) must reach every piece.  Two
ways:

- counted (CPU tensors, or the checked mode on CUDA): the counts are read to the host
  and passed to each piece as the op's coefficients; rows without a valid token are
  skipped, and the caller drops masked tokens before the lm-head;
- on the device (CUDA outside the checked mode; no host read): each piece runs with
  unit normalisers and its loss and gradients are multiplied by a scale that is a
  device tensor (1 / n_t, 1 / n_s, ...), with 0 where the count is 0, as the reference's
  safe division gives.  Every row and token goes through the lm-head (ignored ones give
  0 and no gradient).

A piece is (rows, cols, agg, coefficients, scale) with scale None (nothing to apply),
a Python float or a 0-dim float64 tensor."""
from __future__ import annotations

import torch

from .. import _checkmode

# The coefficients' slots of the normalisers (after clip_low, clip_high, dual_clip,
# log_ratio_clamp, kl_coef).
_TOKENS, _SEQS, _NORM = 5, 6, 7


def pieces(valid: torch.Tensor, chunk: int, agg: str, coefficients: list[float]):
    """Whole rows when a row fits `chunk` tokens, else segments of one row; counted or
    scaled on the device as the module doc says, chosen by whether `valid` may be read."""
    if _checkmode.reads_data(valid):
        return _counted(valid, chunk, agg, coefficients)
    return _on_device(valid, chunk, agg, coefficients)


def on_device(valid: torch.Tensor) -> bool:
    """Whether pieces() gives device-scaled pieces for `valid` (and keeps every token)."""
    return not _checkmode.reads_data(valid)


def span(rows: slice, cols: slice, T: int) -> slice:
    """The flat token range of a piece: whole rows, or a segment of one row."""
    return slice(rows.start * T + cols.start, (rows.stop - 1) * T + cols.stop)


def _counted(valid, chunk, agg, coefficients):
    """The counts read on the host: a row segment under seq-mean-token-mean uses
    seq-mean-token-sum with num_seqs = n_s * (the row's valid tokens), the same per-row
    scale."""
    B, T = valid.shape
    coefficients = list(coefficients)
    if coefficients[_TOKENS] < 0:
        coefficients[_TOKENS] = float(valid.sum())
    row_tokens = valid.sum(-1)
    if coefficients[_SEQS] < 0:
        coefficients[_SEQS] = float((row_tokens > 0).sum())
    if coefficients[_NORM] < 0:
        coefficients[_NORM] = float(T)
    if T <= chunk:
        rows = max(1, chunk // max(T, 1))
        for r0 in range(0, B, rows):
            yield slice(r0, min(r0 + rows, B)), slice(0, T), agg, coefficients, None
        return
    counts = row_tokens.tolist()
    for b in range(B):
        if counts[b] == 0:
            continue
        piece_agg, piece_coefficients = agg, coefficients
        if agg == "seq-mean-token-mean":
            piece_agg = "seq-mean-token-sum"
            piece_coefficients = coefficients[:_SEQS] + [coefficients[_SEQS] * counts[b], coefficients[_NORM]]
        for c0 in range(0, T, chunk):
            yield slice(b, b + 1), slice(c0, min(c0 + chunk, T)), piece_agg, piece_coefficients, None


def _inverse(count):
    """1 / count, 0 where count is 0 (a given count is > 0, checked by the public function)."""
    if not isinstance(count, torch.Tensor):
        return 1.0 / count
    return torch.where(count > 0, 1.0 / torch.where(count > 0, count, 1.0), 0.0)


def _on_device(valid, chunk, agg, coefficients):
    """Unit normalisers in the op (token-sum, or seq-mean-token-mean with n_s = 1 over
    whole rows, whose per-row 1 / (row tokens) the op counts itself) and the batch's
    normalisation as the piece's scale."""
    B, T = valid.shape
    given_tokens, given_seqs, given_norm = coefficients[_TOKENS], coefficients[_SEQS], coefficients[_NORM]
    row_tokens = valid.sum(-1, dtype=torch.float64)
    n_t = row_tokens.sum() if given_tokens < 0 else given_tokens
    n_s = (row_tokens > 0).sum(dtype=torch.float64) if given_seqs < 0 else given_seqs
    t_norm = float(T) if given_norm < 0 else given_norm
    unit = list(coefficients[:_TOKENS]) + [1.0, 1.0, 1.0]
    scale = {"token-mean": lambda: _inverse(n_t), "token-sum": lambda: None,
             "seq-mean-token-sum": lambda: _inverse(n_s), "seq-mean-token-mean": lambda: _inverse(n_s),
             "seq-mean-token-sum-norm": lambda: _inverse(n_s * t_norm)}[agg]()
    if T <= chunk:
        piece_agg = "seq-mean-token-mean" if agg == "seq-mean-token-mean" else "token-sum"
        rows = max(1, chunk // max(T, 1))
        for r0 in range(0, B, rows):
            yield slice(r0, min(r0 + rows, B)), slice(0, T), piece_agg, unit, scale
        return
    for b in range(B):
        row_scale = scale
        if agg == "seq-mean-token-mean":  # a segment's op cannot count its row: 1 / (row tokens * n_s)
            row_scale = _inverse(row_tokens[b] * n_s)
        for c0 in range(0, T, chunk):
            yield slice(b, b + 1), slice(c0, min(c0 + chunk, T)), "token-sum", unit, row_scale
