"""rlkernels.group_advantages: GRPO, Dr. GRPO and RLOO advantages from per-sample scores."""
from __future__ import annotations

import torch

from .. import _backend, _checkmode, _validate as V, reference
from .._dtypes import acc_dtype
from . import _registry

__all__ = ["group_advantages"]

_OP = "group_advantages"
_BASELINES = {"mean": 0, "loo": 1}
_SCALES = {"group": 0, "batch": 1, "none": 2}


def group_advantages(scores: torch.Tensor, group_size: int | None = None, group_index: torch.Tensor | None = None,
                     *, num_groups: int | None = None, baseline: str = "mean", scale: str = "group",
                     eps: float = 1e-6, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages `[N]` for N sampled completions in groups (one group per prompt)
    and a per-group `all_equal` flag `[G]`.

    Groups are contiguous runs of `group_size`, or given by `group_index` `[N]`
    (ids in [0, num_groups), variable sizes; num_groups, at most N, defaults to max id + 1,
    which reads the ids on the host: pass num_groups to keep a CUDA call free of syncs).

    - baseline="mean", scale="group": GRPO, (s - mean_g) / (std_g + eps), unbiased std.
    - scale="none": Dr. GRPO (no std division); scale="batch": divide by the std of
      all scores (TRL's scale_rewards="batch").
    - baseline="loo": RLOO, s minus the mean of the other members of the group.
    A group of one gets advantage 0.  all_equal marks zero-variance groups (equal,
    finite scores: every advantage 0), which trainers may skip; a group holding NaN or
    infinite scores (NaN advantages) is never all-equal.  float32 output (float64 for float64).
    """
    V.float_tensor(_OP, "scores", scores, ndim=1)
    baseline = V.choice(_OP, "baseline", baseline, _BASELINES)
    scale = V.choice(_OP, "scale", scale, _SCALES)
    eps = V.number(_OP, "eps", eps, low=0.0, finite=True)
    N = scores.shape[0]
    if (group_size is None) == (group_index is None):
        raise ValueError(f"{_OP}: pass exactly one of group_size or group_index")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{_OP}: group_size must be an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"{_OP}: group_size must be >= 1, got {group_size}")
        if N % group_size:
            raise ValueError(f"{_OP}: group_size {group_size} does not divide the number of scores {N}")
        groups = N // group_size
        if num_groups is not None and num_groups != groups:
            raise ValueError(f"{_OP}: num_groups={num_groups} but {N} scores in groups of {group_size} make {groups}")
        index = None
    else:
        V.tensor(_OP, "group_index", group_index, dtypes=V.INDEX_DTYPES, ndim=1)
        if group_index.shape[0] != N:
            raise ValueError(f"{_OP}: group_index must have shape [{N}], got {tuple(group_index.shape)}")
        V.same_device(_OP, scores=scores, group_index=group_index)
        index = group_index.to(torch.int64).contiguous()
        if num_groups is None:
            groups = int(index.max()) + 1 if N else 0
        else:
            if isinstance(num_groups, bool) or not isinstance(num_groups, int):
                raise TypeError(f"{_OP}: num_groups must be an int, got {type(num_groups).__name__}")
            if not 0 <= num_groups <= N:
                raise ValueError(f"{_OP}: num_groups must lie in [0, {N}] (at most one group per score), "
                                 f"got {num_groups}")
            groups = num_groups
        # Reads the ids: skipped on CUDA outside the checked mode and while torch.compile
        # traces; the kernels then handle them: the CPU op raises, the CUDA and Triton ops
        # write NaN for a stray id (docs/numerics.md).
        if N and _checkmode.reads_data(index):
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= groups:
                raise ValueError(f"{_OP}: group_index values must lie in [0, {groups}), got [{lo}, {hi}]")
        group_size = 0
    scores = scores.contiguous()
    chosen = _backend.resolve(_OP, backend, scores.device)
    with torch.no_grad():
        if chosen == "reference":
            return reference.group_advantages(scores, group_size or None, index, num_groups=groups,
                                              baseline=baseline, scale=scale, eps=eps)
        fn = _registry.kernel(_OP, chosen)
        return fn(scores, index, group_size, groups, _BASELINES[baseline], _SCALES[scale], eps)


def _group_advantages_fake(scores, group_index, group_size, num_groups, baseline, scale, eps):
    torch._check(scores.dim() == 1, lambda: "scores must be 1-D")
    return (scores.new_empty(scores.shape, dtype=acc_dtype(scores.dtype)),
            scores.new_empty((num_groups,), dtype=torch.bool))


_registry.register(_OP, fake=_group_advantages_fake)
