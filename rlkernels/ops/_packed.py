"""Packed (padding-free) batches: S sequences concatenated into one row of `total`
tokens, laid out as `[total]` (verl's nnz layout) or `[1, total]` (TRL's
padding_free), with flash-attention's `cu_seqlens` (`[S + 1]` cumulative lengths
from 0 to total) or `position_ids` that restart at 0 at each sequence start.

The ops that depend on sequence boundaries run their padded kernel: a gather
index from the packed row to a `[S, max_seqlen]` grid is built once per call on
the tokens' device, the inputs are gathered onto the grid (the padding slots are
masked out), the padded op runs, and token outputs are gathered back into the
input's layout.  A gather copies values exactly, and the gradient of a token is the
grid's gradient at its slot, read back by another gather: a packed call gives what
the padded call gives on the same grid, bit for bit.

Checks that read the values of cu_seqlens / position_ids run on CPU tensors
always and on CUDA only in the checked mode (RLKERNELS_CHECK=1): on CUDA they
would be host syncs.  Pass `max_seqlen` as well and a CUDA call needs no host
read at all; without it the longest length is read once (one sync)."""
from __future__ import annotations

import torch

from .. import _checkmode, _validate as V

def _read_values(device: torch.device) -> bool:
    """Whether the cu_seqlens / position_ids values may be read: on CPU tensors, and on
    CUDA in the checked mode (rlkernels._checkmode, which every data check follows)."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or _checkmode.checks_enabled()


class _Gather(torch.autograd.Function):
    """Packed tokens -> grid slots, whose gradient is the grid's gradient read back at
    each token's own slot (a gather of `total` values: no scatter-add, no atomics, and
    whatever the padding slots receive is never read)."""

    @staticmethod
    def forward(ctx, x, pk):
        ctx.pk = pk
        return x.index_select(0, pk.src.reshape(-1)).reshape(pk.num_seqs, pk.max_seqlen, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        pk = ctx.pk
        return grad.reshape(pk.num_seqs * pk.max_seqlen, *grad.shape[2:]).index_select(0, pk.flat), None


class Packing:
    """Where each packed token sits on the padded `[S, L]` grid, and back.

    src   [S, L]: packed index of each grid slot (clamped on the padding slots);
    valid [S, L] bool: the slot holds a token;
    flat  [total]: grid slot s * L + t of each packed token (built on first use)."""

    def __init__(self, shape: torch.Size, cu: torch.Tensor, lengths: torch.Tensor, max_seqlen: int):
        self.shape, self.total = shape, shape[-1]
        self.num_seqs, self.max_seqlen = cu.shape[0] - 1, max_seqlen
        self._cu, self._lengths = cu, lengths
        device = cu.device
        # int32 indices where they fit: half the index traffic
        self.index_dtype = torch.int32 if max(self.total, self.num_seqs * max_seqlen) < 2**31 else torch.int64
        pos = torch.arange(max_seqlen, dtype=self.index_dtype, device=device)
        self.valid = pos < lengths.unsqueeze(1)
        self.src = (cu[:-1].to(self.index_dtype).unsqueeze(1) + pos).clamp_(max=max(self.total - 1, 0))
        self._flat = None

    @property
    def flat(self) -> torch.Tensor:
        if self._flat is None:
            S, L, total, cu = self.num_seqs, self.max_seqlen, self.total, self._cu
            # token i of sequence s sits at i + (s * L - cu[s]); output_size keeps
            # repeat_interleave from reading the lengths' sum back to the host.
            flat = torch.arange(total, dtype=torch.int64, device=cu.device)
            if S > 0 and total > 0:
                shift = torch.arange(S, dtype=torch.int64, device=cu.device) * L - cu[:-1]
                flat += torch.repeat_interleave(shift, self._lengths, output_size=total)
            # in range even for boundaries no check has read (CUDA outside the checked mode)
            self._flat = flat.clamp_(min=0, max=max(S * L - 1, 0)).to(self.index_dtype)
        return self._flat

    def flatten(self, op: str, name: str, x, trailing: int = 0):
        """x in the packed layout -> [total, ...]; non-tensors pass through (the padded
        op names them in its type error)."""
        if not isinstance(x, torch.Tensor):
            return x
        if x.dim() < trailing or tuple(x.shape[:x.dim() - trailing]) != tuple(self.shape):
            extra = f" plus {trailing} trailing dims" if trailing else ""
            raise ValueError(f"{op}: {name} must have the packed token shape {tuple(self.shape)}{extra}, "
                             f"got {tuple(x.shape)}")
        return x.reshape(self.total, *x.shape[x.dim() - trailing:])

    def pad(self, op: str, name: str, x, trailing: int = 0):
        """x in the packed layout -> [S, L, ...].  Padding slots hold copies of real
        tokens (one gather, no fill pass): the padded ops select masked slots away."""
        x = self.flatten(op, name, x, trailing)
        if not isinstance(x, torch.Tensor):
            return x
        S, L = self.num_seqs, self.max_seqlen
        if self.total == 0 or S * L == 0:
            grid = x.new_zeros((S, L, *x.shape[1:]))
            return grid + x.sum() * 0 if x.requires_grad else grid  # keeps x in the graph
        if x.requires_grad and torch.is_grad_enabled():
            return _Gather.apply(x, self)
        return x.index_select(0, self.src.reshape(-1)).reshape(S, L, *x.shape[1:])

    def flags(self, op: str, name: str, flags) -> torch.Tensor | None:
        """A 0/1 token tensor (mask, dones) -> bool [S, L], False on the padding slots."""
        if flags is None:
            return None
        flags = V.binary_mask(op, name, flags, torch.Size(self.shape), self.valid.device)
        return self.pad(op, name, flags) & self.valid

    def mask(self, op: str, mask) -> torch.Tensor:
        """The padded op's mask: the grid's valid slots, and the caller's mask there."""
        return self.valid if mask is None else self.flags(op, "mask", mask)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """[S, L, ...] -> the packed layout of the inputs."""
        rest = tuple(y.shape[2:])
        packed = y.reshape(self.num_seqs * self.max_seqlen, *rest).index_select(0, self.flat)
        return packed.reshape(*self.shape, *rest)


def _index_tensor(op: str, name: str, value, device: torch.device) -> torch.Tensor:
    V.tensor(op, name, value, dtypes=V.INDEX_DTYPES)
    if value.device != device:
        raise ValueError(f"{op}: {name} is on {value.device} but the tokens are on {device}")
    return value


def cu_from_position_ids(op: str, position_ids, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """position_ids restarting at 0 -> cu_seqlens (int64).  Finding the starts is a
    nonzero(): one host sync on CUDA.  Sequences of length 0 cannot be written this way."""
    _index_tensor(op, "position_ids", position_ids, device)
    if tuple(position_ids.shape) != tuple(shape):
        raise ValueError(f"{op}: position_ids must have the packed token shape {tuple(shape)}, "
                         f"got {tuple(position_ids.shape)}")
    pid = position_ids.reshape(-1).to(torch.int64)
    total = pid.shape[0]
    if total and _read_values(device):
        follows = pid[1:] == pid[:-1] + 1
        restarts = pid[1:] == 0
        if bool(pid[0] != 0) or not bool((follows | restarts).all()):
            raise ValueError(f"{op}: position_ids must start at 0 and count up by 1 within a sequence, "
                             f"restarting at 0 where the next sequence starts")
    starts = torch.nonzero(pid == 0).reshape(-1)
    return torch.cat([starts, torch.full((1,), total, dtype=torch.int64, device=device)])


def packing(op: str, primary_name: str, primary, cu_seqlens, position_ids, max_seqlen,
            trailing: int = 0) -> Packing:
    """Checks the packed layout of `primary` ([total] or [1, total], plus `trailing`
    dims) and its boundaries; returns the gather indices."""
    V.float_tensor(op, primary_name, primary)
    lead = primary.dim() - trailing
    if lead not in (1, 2) or (lead == 2 and primary.shape[0] != 1):
        raise ValueError(f"{op}: a packed {primary_name} must be [total] or [1, total]"
                         f"{' plus ' + str(trailing) + ' trailing dims' if trailing else ''}, "
                         f"got shape {tuple(primary.shape)}")
    shape = torch.Size(primary.shape[:lead])
    total = shape[-1]
    device = primary.device
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError(f"{op}: pass cu_seqlens or position_ids, not both")
    if position_ids is not None:
        cu = cu_from_position_ids(op, position_ids, shape, device)
    else:
        cu = _index_tensor(op, "cu_seqlens", cu_seqlens, device)
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{op}: cu_seqlens must be 1-D [num_seqs + 1], got shape {tuple(cu.shape)}")
        cu = cu.to(torch.int64)
        if _read_values(device):
            if bool(cu[0] != 0):
                raise ValueError(f"{op}: cu_seqlens must start at 0, got {int(cu[0])}")
            if cu.shape[0] > 1 and bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"{op}: cu_seqlens must be nondecreasing")
            if int(cu[-1]) != total:
                raise ValueError(f"{op}: cu_seqlens must end at the packed length {total} of "
                                 f"{primary_name}, got {int(cu[-1])}")
    cu = cu.contiguous()
    S = cu.shape[0] - 1
    lengths = cu[1:] - cu[:-1]
    if max_seqlen is None:
        L = int(lengths.max()) if S > 0 else 0  # the one host read of an unchecked CUDA call
    else:
        L = V.integer(op, "max_seqlen", max_seqlen, low=0)
        if S > 0 and _read_values(device) and bool((lengths > L).any()):
            raise ValueError(f"{op}: max_seqlen {L} is shorter than the longest sequence {int(lengths.max())}")
    return Packing(shape, cu, lengths, L)
