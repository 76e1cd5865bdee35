"""Delegates to rlkernels.benchmarks.losses."""
from rlkernels.benchmarks.losses import *  # noqa: F401,F403
