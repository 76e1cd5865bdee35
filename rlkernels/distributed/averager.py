"""DecentralizedAverager: periodic model averaging for agents that train their own
copy of a policy (local SGD / "decentralized policy optimization").

allreduce and ring modes keep theta_global, the parameters every agent starts a
round from.  Each agent runs `every` local optimizer steps, reaching theta_i =
theta_global + delta_i; the round then sets, on every rank,

    theta_global <- theta_global + alpha * mean_i(delta_i)

and loads theta_global into the module, so all agents start the next round from the
same parameters (alpha = 1 is plain averaging).  gossip mode keeps no shared state:
each round mixes every agent with its two ring neighbours,
theta_i <- theta_i + alpha * (mix_i - theta_i).

A round is all or nothing on each rank: the parameters, theta_global, the optimizer
state and the step counter change only after every exchange of the round (parameters
and optimizer state) has completed; a failure raises AveragingError with all of them
as they were."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

from .. import _validate as V
from ..ops.multi_tensor import gossip_weights, pack_tensors, unpack_tensors
from ._common import Round, bucket_bytes, check_same_everywhere, collect, fault_point, make_buckets, ring, timeout_arg
from .allreduce import reduce_buckets
from .gossip import default_weights, gossip_buckets
from .ring import SEGMENT_BYTES, ring_reduce_

_FN = "DecentralizedAverager"
_MODES = ("allreduce", "ring", "gossip")


class DecentralizedAverager:
    """Call `.step()` after each local optimizer step; every `every` steps it runs an
    averaging round (and returns True).

    mode: "allreduce" (dist.all_reduce per bucket), "ring" (neighbour-only ring
    all-reduce, same result) or "gossip" (one neighbour mixing round, weights as in
    gossip_average).  alpha > 0 scales the averaged update (0 < alpha <= 1 in gossip
    mode).  optimizer + average_optimizer_state=True also averages the optimizer's
    floating-point state (e.g. Adam moments) every round.  broadcast_initial (default:
    True except in gossip mode) copies group rank 0's parameters to every rank at
    construction, so all agents share the first theta_global.  Parameters must have the
    same shapes and dtypes on every rank, and mode, every, alpha, bucket_mb,
    average_optimizer_state and broadcast_initial the same values: checked once here.
    timeout (seconds or timedelta): how long a round waits for each exchange; default
    the process group's timeout.  A round that fails raises AveragingError and leaves
    the parameters, the optimizer state, theta_global and the counters unchanged."""

    def __init__(self, module: torch.nn.Module, *, mode: str = "allreduce", every: int = 1, alpha: float = 1.0,
                 bucket_mb: float = 25, group=None, optimizer: torch.optim.Optimizer | None = None,
                 average_optimizer_state: bool = False, weights: tuple[float, float, float] | None = None,
                 broadcast_initial: bool | None = None, timeout=None, backend: str = "auto"):
        prefix = f"rlkernels.distributed.{_FN}"
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{prefix}: module must be a torch.nn.Module, got {type(module).__name__}")
        self.mode = V.choice(prefix, "mode", mode, _MODES)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{prefix}: every must be an integer >= 1, got {every!r}")
        self.every = every
        self.alpha = V.number(prefix, "alpha", alpha, low=0.0, low_open=True,
                              high=1.0 if self.mode == "gossip" else None)
        self._max_bytes = bucket_bytes(_FN, bucket_mb)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{prefix}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if average_optimizer_state and optimizer is None:
            raise ValueError(f"{prefix}: average_optimizer_state=True needs optimizer=")
        if weights is not None and self.mode != "gossip":
            raise ValueError(f"{prefix}: weights apply to mode='gossip' only, got mode={self.mode!r}")
        self.optimizer = optimizer
        self.average_optimizer_state = bool(average_optimizer_state)
        self.timeout = timeout_arg(_FN, timeout)
        self.backend = backend
        self._where = ring(_FN, group)
        self.group = group
        self._params = collect(_FN, module)
        self._device = self._params[0].device if self._params else None
        if self.mode == "gossip":
            base = default_weights(self._where.size) if weights is None else gossip_weights(prefix, weights)
            # theta + alpha * (mix - theta) is the mix with weights scaled by alpha and
            # (1 - alpha) added to the own weight: still non-negative, still summing to 1.
            self._weights = ((1 - self.alpha) + self.alpha * base[0], self.alpha * base[1], self.alpha * base[2])
        self._buckets = make_buckets(self._params, self._max_bytes)
        if broadcast_initial is None:
            broadcast_initial = self.mode != "gossip"
        settings = {"mode": self.mode, "every": every, "alpha": self.alpha, "bucket_mb": float(bucket_mb),
                    "average_optimizer_state": self.average_optimizer_state,
                    "broadcast_initial": bool(broadcast_initial)}
        with Round(_FN, self._where, self.timeout, "parameters", self._device) as rnd:
            check_same_everywhere(_FN, self._params, self._where, what="params", settings=settings, rnd=rnd)
            initial = self._broadcast_from_rank0(rnd) if broadcast_initial else None
        if initial is not None:
            with torch.no_grad():
                for bucket, flat in zip(self._buckets, initial):
                    unpack_tensors(flat, bucket.tensors, backend=backend)
        self._global: list[torch.Tensor] = []
        self._scratch: list[torch.Tensor] = []
        if self.mode != "gossip":
            # theta_global lives in flat buckets; the scratch buckets hold delta_i during a
            # round and are kept so a round allocates (and page-faults) nothing.
            self._global = initial or [pack_tensors(b.tensors, backend=backend) for b in self._buckets]
            self._scratch = [torch.empty_like(g) for g in self._global]
        self.steps = 0
        self.rounds = 0

    # ---- public ---------------------------------------------------------------------------------

    def step(self) -> bool:
        """Counts one local step; every `every` steps runs `average()` and returns True.
        If that round fails, the step is not counted either (AveragingError)."""
        self.steps += 1
        if self.steps % self.every:
            return False
        try:
            self.average()
        except BaseException:
            self.steps -= 1
            raise
        return True

    def average(self) -> None:
        """Runs one averaging round now (all ranks must call it together).  All or
        nothing: if any exchange fails, raises AveragingError with the parameters,
        the optimizer state and theta_global unchanged."""
        fn = f"{_FN}.average"
        what = "parameters" + (" and optimizer state" if self.average_optimizer_state else "")
        state = self._optimizer_tensors() if self.average_optimizer_state else []
        try:
            with Round(fn, self._where, self.timeout, what, self._device) as rnd:
                if self.average_optimizer_state:
                    # The state appears lazily (after the first optimizer step), so it is
                    # checked every round: one all_gather of 3 integers.
                    check_same_everywhere(fn, state, self._where, what="optimizer state", rnd=rnd)
                if self.mode == "gossip":
                    commit_params = gossip_buckets(self._params, self._where, rnd, self._weights,
                                                   max_bytes=self._max_bytes, backend=self.backend)
                else:
                    commit_params = self._global_round(rnd)
                fault_point(fn, "parameters", 0)
                commit_state = self._optimizer_state_round(state, rnd) if state else None
        except BaseException:
            # an abandoned all_reduce or ring step may still write into the scratch
            self._scratch = [torch.empty_like(g) for g in self._scratch]
            raise
        with torch.no_grad():
            commit_params()
            if commit_state is not None:
                commit_state()
        self.rounds += 1

    @property
    def theta_global(self) -> list[torch.Tensor]:
        """theta_global shaped like the parameters: views of the averager's buffers,
        valid until the next round (a round swaps in the buffers it computed)."""
        if self.mode == "gossip":
            raise AttributeError("DecentralizedAverager: mode='gossip' keeps no theta_global")
        views = {}
        for bucket, flat in zip(self._buckets, self._global):
            offset = 0
            for t in bucket.tensors:
                views[id(t)] = flat[offset:offset + t.numel()].view(t.shape)
                offset += t.numel()
        return [views[id(p)] for p in self._params]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "rounds": self.rounds, "theta_global": [g.clone() for g in self._global]}

    def check_state_dict(self, state) -> None:
        """Raises ValueError/TypeError naming the entry unless load_state_dict can take
        `state` whole: a dict with integer steps >= 0 and rounds >= 0 and theta_global
        as one tensor per bucket of this averager, each of the bucket's exact shape and
        dtype with finite values.  Changes nothing."""
        prefix = f"rlkernels.distributed.{_FN}.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{prefix}: state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("steps", "rounds", "theta_global") if k not in state]
        if missing:
            raise ValueError(f"{prefix}: state is missing {', '.join(missing)}")
        for key in ("steps", "rounds"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{prefix}: state['{key}'] must be an integer >= 0, got {value!r}")
        saved = state["theta_global"]
        if not isinstance(saved, (list, tuple)):
            raise TypeError(f"{prefix}: state['theta_global'] must be a list of tensors, got {type(saved).__name__}")
        if len(saved) != len(self._global):
            raise ValueError(f"{prefix}: state holds {len(saved)} buckets, this averager has {len(self._global)}")
        for k, (own, flat) in enumerate(zip(self._global, saved)):
            if not isinstance(flat, torch.Tensor):
                raise TypeError(f"{prefix}: state['theta_global'][{k}] must be a tensor, got {type(flat).__name__}")
            if flat.shape != own.shape or flat.dtype != own.dtype:
                raise ValueError(f"{prefix}: state['theta_global'][{k}] is {str(flat.dtype).replace('torch.', '')}"
                                 f"{list(flat.shape)}, this averager's bucket is "
                                 f"{str(own.dtype).replace('torch.', '')}{list(own.shape)}")
            if not bool(torch.isfinite(flat).all()):
                raise ValueError(f"{prefix}: state['theta_global'][{k}] holds NaN or infinite values")

    def load_state_dict(self, state: dict) -> None:
        """Restores steps, rounds and theta_global; everything is checked first
        (check_state_dict), so a bad state raises with the averager unchanged."""
        self.check_state_dict(state)
        with torch.no_grad():
            for own, flat in zip(self._global, state["theta_global"]):
                own.copy_(flat)
        self.steps, self.rounds = state["steps"], state["rounds"]

    # ---- internals ------------------------------------------------------------------------------

    def _broadcast_from_rank0(self, rnd: Round) -> list[torch.Tensor] | None:
        """Group rank 0's parameters, packed per bucket (not yet written anywhere)."""
        if self._where.size == 1:
            return None
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        flats = [pack_tensors(bucket.tensors, backend=self.backend) for bucket in self._buckets]
        works = [dist.broadcast(flat, src=src, group=self.group, async_op=True) for flat in flats]
        for k, work in enumerate(works):
            rnd.wait(work, f"broadcast of the initial parameters from rank {src}, bucket {k + 1} of {len(works)}",
                     None if self._where.rank == 0 else src)
        return flats

    def _global_round(self, rnd: Round) -> Callable[[], None]:
        """Computes the next theta_global = theta_global + alpha * sum_i(delta_i) / n
        in the scratch buckets; the returned commit swaps them with theta_global and
        loads it into the parameters."""
        n = self._where.size
        count = len(self._buckets)
        pending: deque = deque()

        def finish() -> None:
            i, work = pending.popleft()
            if work is not None:
                rnd.wait(work, f"all_reduce of bucket {i + 1} of {count}")
            # scratch <- theta_global + alpha * sum / n (rounded as theta_global.add_ would)
            torch.add(self._global[i], self._scratch[i], alpha=self.alpha / n, out=self._scratch[i])
            fault_point(rnd.fn, "bucket", i)

        with torch.no_grad():
            for i, bucket in enumerate(self._buckets):
                delta = pack_tensors(bucket.tensors, out=self._scratch[i], backend=self.backend)
                delta.sub_(self._global[i])
                if n == 1:
                    work = None
                elif self.mode == "ring":
                    ring_reduce_(delta, self._where, rnd, average=False,
                                 segment_elems=max(1, SEGMENT_BYTES // delta.element_size()),
                                 label=f"bucket {i + 1} of {count}")
                    work = None
                else:
                    work = dist.all_reduce(delta, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                pending.append((i, work))
                if len(pending) >= 2:
                    finish()
            while pending:
                finish()

        def commit() -> None:
            self._global, self._scratch = self._scratch, self._global
            for flat, bucket in zip(self._global, self._buckets):
                unpack_tensors(flat, bucket.tensors, backend=self.backend)  # every agent restarts from it

        return commit

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        tensors = []
        for param_group in self.optimizer.param_groups:
            for p in param_group["params"]:
                state = self.optimizer.state.get(p)
                if not state:
                    continue
                for key in sorted(state, key=str):
                    value = state[key]
                    # Step counters are equal on every rank already; mixing them could
                    # only round them off an integer.
                    if key == "step":
                        continue
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0:
                        tensors.append(value.detach())
        return tensors

    def _optimizer_state_round(self, tensors: list[torch.Tensor], rnd: Round) -> Callable[[], None]:
        # staged under tags of their own: the parameter phase's results are still uncommitted
        if self.mode == "gossip":
            return gossip_buckets(tensors, self._where, rnd, self._weights, max_bytes=self._max_bytes,
                                  backend=self.backend, tag="gossip-state")
        return reduce_buckets(tensors, self._where, rnd, average=True, max_bytes=self._max_bytes, mode=self.mode,
                              backend=self.backend, tag="reduce-state")
