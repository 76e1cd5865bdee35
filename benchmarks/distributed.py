"""python -m benchmarks.distributed [--quick]: delegates to rlkernels.benchmarks.distributed."""
import sys

from rlkernels.benchmarks.distributed import *  # noqa: F401,F403
from rlkernels.benchmarks.distributed import run

if __name__ == "__main__":
    run("cpu", "--quick" in sys.argv)
