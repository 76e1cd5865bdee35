"""python -m benchmarks ...: the same as `rlkernels bench ...` (rlkernels.benchmarks)."""
import sys

from rlkernels.benchmarks.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
