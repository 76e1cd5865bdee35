"""Parameter averaging for decentralized agents over torch.distributed (gloo on CPU,
NCCL on GPU; launch with torchrun on one machine or many).  No transport of its own.

- average_parameters: global mean/sum of many tensors, a few bucketed all-reduces.
- ring_all_reduce: the same over neighbour-only point-to-point links.
- gossip_average: one mixing round with the two ring neighbours.
- DecentralizedAverager: theta_global <- theta_global + alpha * mean_i(delta_i) every
  k local steps (or gossip), optionally with the optimizer state.

Every call is all or nothing on each rank: results are staged and written into the
caller's tensors only after every exchange of the round has completed; a dead, slow
or mismatched peer raises AveragingError (a RuntimeError) with them unchanged.

See docs/distributed.md."""
from ._common import AveragingError, AveragingMismatchError, exit_without_teardown, release_buffers
from .allreduce import average_parameters
from .averager import DecentralizedAverager
from .gossip import gossip_average
from .ring import ring_all_reduce

__all__ = ["average_parameters", "ring_all_reduce", "gossip_average", "DecentralizedAverager", "release_buffers",
           "AveragingError", "AveragingMismatchError", "exit_without_teardown"]
