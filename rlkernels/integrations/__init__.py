"""Drop rlkernels into RL libraries you already use.

- `patch_trl()` / `unpatch_trl()`: TRL's per-token log-prob and entropy functions
  (`selective_log_softmax`, `entropy_from_logits`, `selective_log_softmax_and_entropy`)
  and the chunked LM-head log-prob function behind its fused LM head (GRPO, RLOO)
  run on the rlkernels kernels.  TRL 1.x computes its KL terms and (experimental) GAE
  inline, so there is no function of those to replace.

verl is not covered: its releases pin transformers < 5.11 and pull ray, so it cannot
be installed next to this package's transformers 5.x to test against."""
from .trl import patch_trl, unpatch_trl

__all__ = ["patch_trl", "unpatch_trl"]
