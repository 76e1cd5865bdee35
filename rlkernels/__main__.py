"""`python -m rlkernels ...` is the `rlkernels` command."""
from .cli import entry

if __name__ == "__main__":
    entry()
