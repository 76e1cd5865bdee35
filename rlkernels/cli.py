"""`rlkernels` command line: `train` and `demo` (rlkernels/trainers/cli.py), `bench`
(rlkernels/benchmarks/) and `info`."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _bench(argv: list[str]) -> int:
    from .benchmarks.__main__ import main as bench_main

    return bench_main(argv) or 0


def _info(_args) -> int:
    import rlkernels

    print(json.dumps(rlkernels.info(), indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .trainers.cli import OneLineParser, add_demo_parser, add_train_parser

    parser = OneLineParser(prog="rlkernels", description="rlkernels: kernels for RL fine-tuning of LLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,demo,bench,info}")
    add_train_parser(sub)
    add_demo_parser(sub)
    sub.add_parser("bench", help="microbenchmarks against pure-PyTorch baselines (rlkernels bench --help)",
                   add_help=False)
    sub.add_parser("info", help="build and runtime facts").set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark runner
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry() -> None:
    """The `rlkernels` command and `python -m rlkernels`: main(), then exit with its code.
    Under torchrun (RANK and WORLD_SIZE set) the process leaves without interpreter
    teardown, where gloo with torch 2.13 sometimes aborts after a clean run
    (docs/distributed.md)."""
    code = main()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from .distributed import exit_without_teardown

        exit_without_teardown(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    entry()
