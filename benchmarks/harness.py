"""Delegates to rlkernels.benchmarks.harness."""
from rlkernels.benchmarks.harness import *  # noqa: F401,F403
