"""Drop rlkernels into RL libraries you already use.

- `patch_trl()` / `unpatch_trl()`: TRL's per-token log-prob and entropy functions
  (`selective_log_softmax`, `entropy_from_logits`, `selective_log_softmax_and_entropy`)
  and the chunked LM-head log-prob function behind its fused LM head (GRPO, RLOO)
  run on the rlkernels kernels.  TRL 1.x computes its KL terms and (experimental) GAE
  inline, so there is no function of those to replace.
- `patch_verl()` / `unpatch_verl()`: verl's `logprobs_from_logits`,
  `entropy_from_logits(_with_chunking)`, `kl_penalty(_forward)`, GAE and the GRPO /
  RLOO outcome advantages (also in `ADV_ESTIMATOR_REGISTRY`) run on the rlkernels
  kernels.

Both replace the functions wherever the library's loaded modules hold them by name,
keep the library's signatures and result dtypes, fall back to the library's own
function for what they do not cover, and are undone exactly by the unpatch call."""
from .trl import patch_trl, unpatch_trl
from .verl import patch_verl, unpatch_verl

__all__ = ["patch_trl", "unpatch_trl", "patch_verl", "unpatch_verl"]
