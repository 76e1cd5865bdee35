"""One public function per op; each validates its arguments, picks a backend and
runs the op's kernel.  Fake kernels and autograd are registered once per op, for
the compiled op and its Triton twin alike (see _registry.py).  Each family module
lists its public functions in `__all__`; this package exports them all."""
from .._exports import collect

__all__ = collect(__name__, __path__, globals())
