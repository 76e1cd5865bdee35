"""Triton kernels: each op's twin rlkernels::<op>_triton, defined from the compiled
op's schema by rlkernels.ops._registry.  Imported by rlkernels when triton is
importable; on CPU tensors they run under TRITON_INTERPRET=1 (how CI checks them)."""
from . import gae  # noqa: F401
from . import group_advantages  # noqa: F401
from . import masked  # noqa: F401
from . import logprobs  # noqa: F401
from . import kl_from_logits  # noqa: F401
from . import kl_vocab_tile  # noqa: F401
from . import kl_penalty  # noqa: F401
from . import _token_loss  # noqa: F401
from . import policy_loss  # noqa: F401
from . import value_loss  # noqa: F401
from . import preference  # noqa: F401
from . import multi_tensor  # noqa: F401
