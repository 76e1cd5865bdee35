"""How linear_ppo_loss' op (rlkernels::linear_policy_loss) cuts the [B, T] token grid
into pieces, and how each piece's share of the loss is normalised: which of its three
ways a call takes is decided here (`mode`), the pieces themselves are planned in C++
(csrc/lm_head/linear_policy_loss.cpp, device_pieces / counted_pieces).

Each piece goes through the policy op on its own, so the batch's normalisers (valid
tokens n_t, sequences with a valid token n_s, T_norm) must reach every piece.  Pieces
are whole rows when a row fits the chunk, else segments of one row.  Two ways:

- counted (CPU tensors, or the checked mode on CUDA): the counts are read to the host
  and passed to each piece as the op's coefficients; rows without a valid token are
  skipped.  Masked tokens go through the lm-head with zero hidden states ("counted"),
  or, on large problems, are dropped before it ("counted-valid": a gather and two
  scatters, tens of microseconds, against the matmul rows they save);
- on the device ("device": CUDA outside the checked mode; no host read): each piece runs
  with unit normalisers and its loss and gradients are multiplied by a scale that is a
  device tensor (1 / n_t, 1 / n_s, ...), with 0 where the count is 0, as the reference's
  safe division gives (a given count: a number).  Every row and token goes through the
  lm-head (ignored ones give 0 and no gradient)."""
from __future__ import annotations

import torch

from .. import _checkmode


def mode(valid: torch.Tensor, small: bool) -> str:
    """The op's `pieces` argument: counted where `valid` may be read when the op runs
    (masked tokens through the lm-head where the problem is `small`), on the device
    elsewhere.  The op's body runs on real tensors, never under a torch.compile trace
    (its fake kernel stands in), so a traced call decides as the eager call on the same
    tensors would."""
    if torch.compiler.is_compiling():
        counted = valid.device.type != "cuda" or _checkmode.checks_enabled()
    else:
        counted = _checkmode.reads_data(valid)
    if not counted:
        return "device"
    return "counted" if small else "counted-valid"
