"""The fake kernel of kl_vocab_tile, KL's chunk rule in pieces (csrc/core/kl_from_logits.h),
which rlkernels.distributed.vocab_parallel.kl_from_logits(exact=True) runs; no public
function of its own."""
from __future__ import annotations

from . import _registry

__all__: list[str] = []


def _fake_kl_vocab_tile(logits, ref_logits, state, temperature, vocab_start, finish):
    return None  # updates `state` in place


_registry.register("kl_vocab_tile", fake=_fake_kl_vocab_tile)
