"""`python -m benchmarks` in a source checkout.  The benchmarks live in the package,
as `rlkernels.benchmarks` (what `rlkernels bench` runs); these modules only delegate
to it, so nothing named `benchmarks` is installed."""
from rlkernels.benchmarks import FAMILIES

__all__ = ["FAMILIES"]
