"""One public function per op; each validates its arguments, picks a backend and
registers the fake kernel (and autograd where the op has a gradient)."""
from .discounted_returns import discounted_returns
from .gae import gae
from .multi_tensor import gossip_mix, pack_tensors, unpack_tensors

__all__ = ["gae", "discounted_returns"]
__all__ += ["pack_tensors", "unpack_tensors", "gossip_mix"]
