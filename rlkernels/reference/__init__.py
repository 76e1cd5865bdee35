"""Pure-PyTorch definitions of every rlkernels op: the truth that tests and
benchmarks compare against, and the `backend="reference"` path.  Each family module
lists its public functions in `__all__`; this package exports them all."""
from .._exports import collect

__all__ = collect(__name__, __path__, globals())
