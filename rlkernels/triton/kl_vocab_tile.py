"""kl_vocab_tile in Triton: KL's per-chunk statistics (csrc/core/kl_from_logits.h), one
program per (row, vocabulary chunk) of the tile, then, with finish, one program per row
folding the slots in chunk order.  The same arithmetic as the CPU kernel, not its bits:
the vocabulary-parallel exact mode runs the CPU op."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._library import VOCAB_CHUNK
from ..ops._registry import triton_twin
from . import _checks as C
from ._common import on_inputs_device
from ._vocab import _LOG2E, readable, row_base
from .kl_from_logits import _kl_shift, _kl_span

_CHUNK = VOCAB_CHUNK  # the CPU kernel's chunk, whatever tests set _vocab.VOCAB_CHUNK to
_SLOT = 6  # kKlSlotWidth: (ma, sa, w, mb, sb, 0), or (KL, saved[0..4]) when finished


@triton.jit
def _chunk_kernel(a_ptr, b_ptr, state_ptr, V, inner, outer_stride, inner_stride, b_inner, b_outer_stride,
                  b_inner_stride, chunks, first, scale, inv_t, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (row, chunk of the tile): the chunk's statistics from nothing, as the
    kl_from_logits forward computes a chunk (_kl_span), into the chunk's slot."""
    row = tl.program_id(0).to(tl.int64)
    begin = tl.program_id(1).to(tl.int64) * CHUNK
    end = tl.where(begin + CHUNK < V, begin + CHUNK, V)
    ma, sa, w, mb, sb = _kl_span(row_base(a_ptr, row, inner, outer_stride, inner_stride),
                                 row_base(b_ptr, row, b_inner, b_outer_stride, b_inner_stride), begin, end, scale,
                                 inv_t, BLOCK)
    slot = state_ptr + (row * chunks + first + tl.program_id(1)) * 6
    tl.store(slot, ma)
    tl.store(slot + 1, sa)
    tl.store(slot + 2, w)
    tl.store(slot + 3, mb)
    tl.store(slot + 4, sb)
    tl.store(slot + 5, 0.0)


@triton.jit
def _fold_kernel(state_ptr, chunks, scale, inv_t):
    row = tl.program_id(0).to(tl.int64)
    base = state_ptr + row * chunks * 6
    ma = tl.zeros([], dtype=tl.float32) - float("inf")
    mb = tl.zeros([], dtype=tl.float32) - float("inf")
    sa = tl.zeros([], dtype=tl.float32)
    sb = tl.zeros([], dtype=tl.float32)
    w = tl.zeros([], dtype=tl.float32)
    for c in range(0, chunks):  # kl_stats_merge(acc, chunk), acc first, in chunk order
        pma = tl.load(base + c * 6)
        psa = tl.load(base + c * 6 + 1)
        pw = tl.load(base + c * 6 + 2)
        pmb = tl.load(base + c * 6 + 3)
        psb = tl.load(base + c * 6 + 4)
        new_ma = tl.maximum(ma, pma)
        new_mb = tl.maximum(mb, pmb)
        # each side moves onto the new maxima (a side with sa = 0 adds nothing)
        ca = tl.exp2(tl.where(sa != 0.0, (ma - new_ma) * scale, 0.0))
        sha = ((ma - new_ma) - (_kl_shift(mb) - _kl_shift(new_mb))) * inv_t
        cp = tl.exp2(tl.where(psa != 0.0, (pma - new_ma) * scale, 0.0))
        shp = ((pma - new_ma) - (_kl_shift(pmb) - _kl_shift(new_mb))) * inv_t
        w_acc = tl.where(sa != 0.0, tl.where(w == float("inf"), w, ca * (w + sa * sha)), 0.0)
        w_part = tl.where(psa != 0.0, tl.where(pw == float("inf"), pw, cp * (pw + psa * shp)), 0.0)
        w = w_acc + w_part
        sa = tl.where(sa != 0.0, ca * sa, 0.0) + tl.where(psa != 0.0, cp * psa, 0.0)
        cb = tl.exp2(tl.where(sb != 0.0, (mb - new_mb) * scale, 0.0))
        cq = tl.exp2(tl.where(psb != 0.0, (pmb - new_mb) * scale, 0.0))
        sb = tl.where(sb != 0.0, cb * sb, 0.0) + tl.where(psb != 0.0, cq * psb, 0.0)
        ma = new_ma
        mb = new_mb
    log_sa = tl.log(sa)
    log_sb = tl.log(sb)
    mean_ratio = w / sa
    tl.store(base, mean_ratio - log_sa + log_sb)
    tl.store(base + 1, ma)
    tl.store(base + 2, log_sa)
    tl.store(base + 3, mb)
    tl.store(base + 4, log_sb)
    tl.store(base + 5, mean_ratio)


@triton_twin("kl_vocab_tile")
@on_inputs_device
def kl_vocab_tile_triton(logits: torch.Tensor, ref_logits: torch.Tensor, state: torch.Tensor, temperature: float,
                         vocab_start: int, finish: bool) -> None:
    op = "kl_vocab_tile"
    C.need(logits.dim() >= 1, op, "logits must have a vocabulary dimension")
    C.floating(op, "logits", logits, C.LOGIT_FLOATS)
    C.need(ref_logits.shape == logits.shape and ref_logits.dtype == logits.dtype, op,
           f"ref_logits must have the shape and dtype of logits {tuple(logits.shape)}, got "
           f"{tuple(ref_logits.shape)} {ref_logits.dtype}")
    C.on_device(op, "ref_logits", ref_logits, logits)
    C.positive(op, "temperature", temperature)
    C.need(vocab_start >= 0, op, f"vocab_start must be >= 0, got {vocab_start}")
    lead = tuple(logits.shape[:-1])
    C.need(state.dtype == torch.float32 and state.is_contiguous() and state.dim() == logits.dim() + 1
           and state.shape[-1] == _SLOT and tuple(state.shape[:-2]) == lead, op,
           f"state must be a contiguous float32 tensor [..., C, {_SLOT}] with the leading shape of logits {lead} "
           f"(one slot per vocabulary chunk), got {tuple(state.shape)} {state.dtype}")
    C.on_device(op, "state", state, logits)
    V, chunks = logits.shape[-1], state.shape[-2]
    tile_chunks = -(-V // _CHUNK)
    C.need(V == 0 or vocab_start % _CHUNK == 0, op,
           f"vocab_start must be a multiple of the vocabulary chunk ({_CHUNK}), got {vocab_start}")
    C.need(V == 0 or vocab_start // _CHUNK + tile_chunks <= chunks, op,
           f"the tile [{vocab_start}, {vocab_start + V}) reaches past the state's {chunks} chunks")
    C.need(not finish or -(-(vocab_start + V) // _CHUNK) == chunks, op,
           f"with finish, the row ends at {vocab_start + V} columns, which is {-(-(vocab_start + V) // _CHUNK)} "
           f"chunks, but state holds {chunks}")
    N = math.prod(lead)
    if N == 0:
        return
    scale, inv_t = _LOG2E / temperature, 1.0 / temperature
    if V > 0:
        a, (inner, outer_stride, inner_stride) = readable(logits)
        b, (b_inner, b_outer_stride, b_inner_stride) = readable(ref_logits)
        _chunk_kernel[(N, tile_chunks)](a, b, state, V, inner, outer_stride, inner_stride, b_inner, b_outer_stride,
                                        b_inner_stride, chunks, vocab_start // _CHUNK, scale, inv_t, CHUNK=_CHUNK,
                                        BLOCK=min(2048, max(16, triton.next_power_of_2(V))))
    if finish and chunks > 0:
        _fold_kernel[(N,)](state, chunks, scale, inv_t)
