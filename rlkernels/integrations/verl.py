"""patch_verl(): verl's log-prob, entropy, KL and advantage functions on the rlkernels kernels.

Replaced in `verl.utils.torch_functional`, `verl.trainer.ppo.core_algos`, every loaded
`verl` module that imported them by name, and `core_algos.ADV_ESTIMATOR_REGISTRY`
(modules imported later pick the replacements up from the defining module):

- `logprobs_from_logits(logits, labels, inplace_backward=True)` -> `rlkernels.logprobs`.
  Result dtype as verl's path would give it: float32 where verl uses flash-attn's
  cross entropy, the logits' dtype on its PyTorch path (`logprobs_from_logits_v2`).
- `entropy_from_logits(logits)` (the logits' dtype) and
  `entropy_from_logits_with_chunking(logits, chunk_size=2048)` (the default dtype, as
  verl's) -> `rlkernels.logprobs(..., entropy=True)`.
- `kl_penalty(logprob, ref_logprob, kl_penalty)` and `kl_penalty_forward` ->
  `rlkernels.kl_penalty`: kl/k1, abs, mse/k2, low_var_kl/k3 and the straight-through
  kl+/k1+, low_var_kl+/k3+, mse+/k2+ (which verl makes plain k2); "abs+", "full" and
  unknown kinds go to verl's own.  Result in the inputs' promoted dtype.
- `compute_gae_advantage_return` ("gae") -> `rlkernels.gae` + `rlkernels.masked_whiten`.
- `compute_grpo_outcome_advantage` ("grpo"), `compute_rloo_outcome_advantage` ("rloo"),
  `compute_grpo_vectorized_outcome_advantage` ("grpo_vectorized") and
  `compute_rloo_vectorized_outcome_advantage` ("rloo_vectorized") ->
  `rlkernels.group_advantages`, groups from verl's `index` ids, and verl's rule for a
  group of one kept (GRPO: s / (1 + epsilon), or s without std scaling; RLOO: s;
  RLOO vectorised: 0).

Where the patched results differ from verl's (docs/trainers.md, "verl integration"):
GAE advantages are 0 at masked positions (verl leaves whitened carried values there,
which its losses and metrics mask out), and log-probs, entropy and KL of bfloat16 or
float16 inputs are computed in float32 and rounded once (verl computes them in the
input dtype).  Everything else the replacements do not cover (other devices or
dtypes, non-0/1 masks, fewer than two valid GAE tokens, ids numpy cannot sort, shapes
verl would broadcast) goes to verl's own function."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ._patching import FunctionPatch

_PATCH = FunctionPatch("verl")
_original = _PATCH.original
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ADV_DTYPES = (torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda")

# verl kind -> rlkernels kind; "mse+"/"k2+" are k2 in value and gradient in verl
_KL_FORWARD_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_KL_KINDS = {**_KL_FORWARD_KINDS, "kl+": "k1+", "k1+": "k1+", "low_var_kl+": "k3+", "k3+": "k3+",
             "mse+": "k2", "k2+": "k2"}


# ---- log-probs and entropy ---------------------------------------------------------------------

def _logits_covered(logits, labels=None) -> bool:
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _LOGIT_DTYPES:
        return False
    if logits.device.type not in _DEVICES or logits.dim() < 2 or logits.shape[-1] == 0:
        return False
    return labels is None or (isinstance(labels, torch.Tensor) and labels.shape == logits.shape[:-1]
                              and labels.dtype in (torch.int64, torch.int32) and labels.device == logits.device)


def _verl_logprobs_dtype(logits: torch.Tensor) -> torch.dtype | None:
    """The dtype verl's logprobs_from_logits returns here, None for its NPU path."""
    import verl.utils.torch_functional as verl_F

    if (getattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
            and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"):
        return torch.float32  # flash-attn's cross entropy returns float32 losses
    if getattr(verl_F, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", False):
        return None
    return logits.dtype  # logprobs_from_logits_v2


def logprobs_from_logits(logits, labels, inplace_backward=True):
    import rlkernels

    dtype = _verl_logprobs_dtype(logits) if _logits_covered(logits, labels) else None
    if dtype is None:
        return _original("logprobs_from_logits")(logits, labels, inplace_backward)
    # rlkernels' backward is fused already; writing the gradient into the logits
    # buffer would clobber logits verl may still read (e.g. for the entropy)
    return rlkernels.logprobs(logits, labels).to(dtype)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    import rlkernels

    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return rlkernels.logprobs(logits, labels, entropy=True)[1]


def entropy_from_logits(logits):
    if not _logits_covered(logits):
        return _original("entropy_from_logits")(logits)
    return _entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits, chunk_size: int = 2048):
    if (not _logits_covered(logits) or logits.dim() != 2 or isinstance(chunk_size, bool)
            or not isinstance(chunk_size, int) or chunk_size <= 0):
        return _original("entropy_from_logits_with_chunking")(logits, chunk_size)
    return _entropy(logits).to(torch.get_default_dtype())


# ---- KL penalty --------------------------------------------------------------------------------

def _kl(logprob, ref_logprob, kind, kinds: dict, fallback: str):
    import rlkernels

    covered = (isinstance(kind, str) and kind in kinds and isinstance(logprob, torch.Tensor)
               and isinstance(ref_logprob, torch.Tensor) and logprob.shape == ref_logprob.shape
               and logprob.dtype in _LOGIT_DTYPES and ref_logprob.dtype in _LOGIT_DTYPES
               and logprob.device == ref_logprob.device and logprob.device.type in _DEVICES)
    if not covered:
        return _original(fallback)(logprob, ref_logprob, kind)
    dtype = torch.promote_types(logprob.dtype, ref_logprob.dtype)
    return rlkernels.kl_penalty(logprob, ref_logprob, kinds[kind]).to(dtype)


def kl_penalty(logprob, ref_logprob, kl_penalty):
    return _kl(logprob, ref_logprob, kl_penalty, _KL_KINDS, "kl_penalty")


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    return _kl(logprob, ref_logprob, kl_penalty, _KL_FORWARD_KINDS, "kl_penalty_forward")


# ---- GAE ---------------------------------------------------------------------------------------

def _unit_number(value) -> float | None:
    """A float in [0, 1] from a number or a one-element tensor, else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if 0.0 <= value <= 1.0 else None


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE + masked whitening.  Advantages are 0 at masked positions (verl's
    are whitened carried values there); returns are verl's everywhere."""
    import rlkernels

    rewards = token_level_rewards
    gamma_value, lam_value = _unit_number(gamma), _unit_number(lam)
    covered = (gamma_value is not None and lam_value is not None
               and all(isinstance(t, torch.Tensor) for t in (rewards, values, response_mask))
               and rewards.dim() == 2 and values.shape == rewards.shape and response_mask.shape == rewards.shape
               and rewards.dtype in _ADV_DTYPES and values.dtype in _ADV_DTYPES
               and not response_mask.dtype.is_complex
               and rewards.device.type in _DEVICES and values.device == rewards.device
               and response_mask.device == rewards.device)
    if covered:
        with torch.no_grad():
            valid = response_mask != 0
            # one read: masks other than 0/1 blend in verl, and fewer than two valid
            # tokens make verl's unbiased variance raise
            non_binary, count = torch.stack([(valid & (response_mask != 1)).any().long(), valid.sum()]).tolist()
        covered = not non_binary and count >= 2
    if not covered:
        return _original("compute_gae_advantage_return")(rewards, values, response_mask, gamma, lam)
    float_dtype = torch.promote_types(rewards.dtype, values.dtype)
    dtype = torch.promote_types(float_dtype, response_mask.dtype) if response_mask.dtype.is_floating_point \
        else float_dtype
    with torch.no_grad():
        advantages, returns = rlkernels.gae(rewards, values, valid, gamma=gamma_value, lam=lam_value)
        advantages = rlkernels.masked_whiten(advantages, valid)
    return advantages.to(dtype), returns.to(dtype)


# ---- group (outcome) advantages ----------------------------------------------------------------

def _group_ids(index, size: int):
    """(group of each sample, members per group) from verl's ids by np.unique, or None
    where numpy cannot sort them or they could compare unlike verl's dict keys (NaN)."""
    try:
        ids = np.asarray(index)
        if ids.ndim != 1 or ids.shape[0] != size:
            return None
        if ids.dtype.kind in "fc" and np.isnan(ids).any():
            return None
        _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    except (TypeError, ValueError):
        return None
    return inverse.reshape(-1).astype(np.int64), counts.astype(np.int64)


def _outcome_covered(token_level_rewards, response_mask, epsilon, dtypes) -> bool:
    return (isinstance(token_level_rewards, torch.Tensor) and isinstance(response_mask, torch.Tensor)
            and token_level_rewards.dim() == 2 and token_level_rewards.dtype in dtypes
            and token_level_rewards.device.type in _DEVICES and response_mask.device == token_level_rewards.device
            and response_mask.shape == token_level_rewards.shape
            and isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
            and math.isfinite(epsilon) and epsilon >= 0)  # others go to verl's own function


def _group_advantages(scores, group_of, num_groups, baseline, scale, epsilon):
    import rlkernels

    group_index = torch.from_numpy(group_of).to(scores.device)
    advantages, _ = rlkernels.group_advantages(scores, group_index=group_index, num_groups=num_groups,
                                               baseline=baseline, scale=scale, eps=float(epsilon))
    return advantages, group_index


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    groups = None
    if _outcome_covered(token_level_rewards, response_mask, epsilon, _ADV_DTYPES):
        groups = _group_ids(index, token_level_rewards.shape[0])
    if groups is None:
        return _original("compute_grpo_outcome_advantage")(token_level_rewards, response_mask, index, epsilon,
                                                           norm_adv_by_std_in_grpo, config)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        scale = "group" if norm_adv_by_std_in_grpo else "none"
        advantages, group_index = _group_advantages(scores, groups[0], len(groups[1]), "mean", scale, epsilon)
        # verl: a group of one has mean 0 and std 1, a default-dtype tensor (+ epsilon)
        alone = torch.from_numpy(groups[1] == 1).to(scores.device)[group_index]
        one = torch.ones((), device=scores.device)
        single = scores / (one + epsilon) if norm_adv_by_std_in_grpo else scores
        scores = torch.where(alone, single, advantages.to(scores.dtype))
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    groups = None
    if _outcome_covered(token_level_rewards, response_mask, epsilon, _ADV_DTYPES):
        groups = _group_ids(index, token_level_rewards.shape[0])
    if groups is None:
        return _original("compute_rloo_outcome_advantage")(token_level_rewards, response_mask, index, epsilon,
                                                           config, **kwargs)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        advantages, group_index = _group_advantages(scores, groups[0], len(groups[1]), "loo", "none", epsilon)
        alone = torch.from_numpy(groups[1] == 1).to(scores.device)[group_index]
        scores = torch.where(alone, scores, advantages.to(scores.dtype))  # verl: a group of one keeps its score
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def compute_grpo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                              norm_adv_by_std_in_grpo=True, config=None):
    """verl groups these ids with its own as_torch_index (numeric strings and
    near-integer floats merge) and takes its statistics in float32."""
    covered = _outcome_covered(token_level_rewards, response_mask, epsilon, _LOGIT_DTYPES)
    if covered:
        from verl.utils.groupwise import as_torch_index

        try:
            ids = as_torch_index(index, device="cpu")
        except Exception:  # verl's own function will say what is wrong with the ids
            covered = False
        else:
            covered = ids.dim() == 1 and ids.shape[0] == token_level_rewards.shape[0]
    if not covered:
        return _original("compute_grpo_vectorized_outcome_advantage")(
            token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        _, group_of, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        scale = "group" if norm_adv_by_std_in_grpo else "none"
        advantages, group_index = _group_advantages(scores.float(), group_of.numpy(), counts.shape[0], "mean",
                                                    scale, epsilon)
        alone = (counts == 1).to(scores.device)[group_index]
        alone_value = scores.float() / (1.0 + epsilon) if norm_adv_by_std_in_grpo else scores.float()
        dtype = torch.promote_types(scores.dtype, torch.float32)
        advantages = torch.where(alone, alone_value, advantages).to(dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                              **kwargs):
    groups = None
    if _outcome_covered(token_level_rewards, response_mask, epsilon, _ADV_DTYPES):
        groups = _group_ids(index, token_level_rewards.shape[0])
    if groups is None:
        return _original("compute_rloo_vectorized_outcome_advantage")(token_level_rewards, response_mask, index,
                                                                      epsilon, config, **kwargs)
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        advantages, _ = _group_advantages(scores, groups[0], len(groups[1]), "loo", "none", epsilon)
        advantages = advantages.to(scores.dtype).unsqueeze(-1) * response_mask  # a group of one: 0, as verl's
    return advantages, advantages


_FUNCTIONAL = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")
_CORE_ALGOS = ("kl_penalty", "kl_penalty_forward", "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
               "compute_rloo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
               "compute_rloo_vectorized_outcome_advantage")
_REPLACEMENTS = {name: globals()[name] for name in _FUNCTIONAL + _CORE_ALGOS}


def patch_verl() -> list[str]:
    """Points verl's log-prob, entropy, KL and GAE/GRPO/RLOO functions at rlkernels in
    this process; returns the patched `module.attribute` and `registry[key]` names.
    Idempotent; `unpatch_verl()` restores verl's own.  verl runs its workers as Ray
    actors in other processes: call it there too (docs/trainers.md)."""
    try:
        import verl.trainer.ppo.core_algos as core_algos
        import verl.utils.torch_functional as verl_F
    except ImportError as exc:
        raise ImportError(f"patch_verl needs verl (pip install verl): {exc}") from exc
    originals = {name: getattr(verl_F, name) for name in _FUNCTIONAL if hasattr(verl_F, name)}
    originals.update({name: getattr(core_algos, name) for name in _CORE_ALGOS if hasattr(core_algos, name)})
    registries = {"verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY": core_algos.ADV_ESTIMATOR_REGISTRY}
    return _PATCH.apply(originals, _REPLACEMENTS, registries)


def unpatch_verl() -> None:
    """Restores every attribute and registry entry patch_verl replaced."""
    _PATCH.restore()
