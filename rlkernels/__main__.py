"""`python -m rlkernels ...` is the `rlkernels` command."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # An agent under torchrun: with gloo, torch 2.13 sometimes aborts in interpreter
        # teardown after a clean run (docs/distributed.md); the work is done, so leave
        # without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
