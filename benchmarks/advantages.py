"""Delegates to rlkernels.benchmarks.advantages."""
from rlkernels.benchmarks.advantages import *  # noqa: F401,F403
