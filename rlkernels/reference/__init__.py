"""Pure-PyTorch definitions of every rlkernels op: the truth that tests and
benchmarks compare against, and the `backend="reference"` path."""
from .advantages import discounted_returns, gae

__all__ = ["gae", "discounted_returns"]
from .multi_tensor import gossip_mix, pack_tensors, unpack_tensors  # noqa: E402

__all__ += ["pack_tensors", "unpack_tensors", "gossip_mix"]
