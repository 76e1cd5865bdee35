"""Delegates to rlkernels.benchmarks.logprobs."""
from rlkernels.benchmarks.logprobs import *  # noqa: F401,F403
