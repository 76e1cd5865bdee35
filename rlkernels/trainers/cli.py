"""The `train` and `demo` subcommands of `rlkernels` (rlkernels/cli.py wires them in)."""
from __future__ import annotations

import argparse
import os
import sys

from . import TRAINERS
from .config import ConfigError
from .kernels import KERNEL_SETS

DEFAULT_COMPARE_STEPS = 5


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train with one of the thin trainers (embedded default data, no downloads)",
        description="Train with one of the thin trainers. Without --config the embedded default runs: a tiny "
                    "GPT-2 built in code, generated prompts and a rule-based reward (or CartPole for ppo).")
    p.add_argument("trainer", choices=TRAINERS)
    p.add_argument("--config", metavar="FILE", help="JSON, TOML or YAML file with config keys")
    p.add_argument("--steps", type=int, help="total training steps (with --resume: the step to stop at)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/<trainer>)")
    p.add_argument("--kernels", choices=KERNEL_SETS, help="rlkernels ops or their pure-PyTorch references")
    p.add_argument("--compare", action="store_true",
                   help=f"run both kernel sets for a few steps (--steps, default {DEFAULT_COMPARE_STEPS}) and "
                        "report step time and peak memory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted for sections, e.g. model.n_layer=4); repeatable")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="a short PPO-RLHF run on the embedded default with its reward curve")
    p.add_argument("--out", metavar="DIR", default=os.path.join("runs", "demo"))
    p.add_argument("--steps", type=int, default=None, help="PPO steps (default from the demo config)")
    p.add_argument("--kernels", choices=KERNEL_SETS, default="rlkernels")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_demo)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - the train extra is missing
        pass


def run_train(args) -> int:
    from . import MissingExtra, check_extras, make_config, saved_config, train
    from .config import parse_overrides, read_file

    _quiet_transformers()
    name = args.trainer
    out = args.out or os.path.join("runs", name)
    try:
        sources = []
        if args.resume:
            sources.append(saved_config(name, out))
        if args.config:
            sources.append(read_file(args.config))
        sources.append(parse_overrides(args.set))
        command_line = {"steps": args.steps, "kernels": args.kernels, "seed": args.seed, "device": args.device,
                        "progress": False if args.no_progress else None}
        sources.append({k: v for k, v in command_line.items() if v is not None and not (args.compare and k == "steps")})
        config = make_config(name, *sources)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"rlkernels train {name}: {exc}", file=sys.stderr)
        return 2
    try:
        check_extras(name, config.replace(plot=False) if args.compare else config, out)
    except MissingExtra as exc:
        print(f"rlkernels train {name}: {exc}", file=sys.stderr)
        return 2
    if args.compare:
        from .compare import compare

        if args.resume:
            print("rlkernels train: --compare starts fresh runs; drop --resume", file=sys.stderr)
            return 2
        compare(name, config.to_dict(), steps=args.steps or DEFAULT_COMPARE_STEPS, out=out)
        return 0
    metrics = train(name, config, out, resume=args.resume)
    print(summary_line(name, metrics, out))
    return 0


def summary_line(name: str, metrics: list[dict], out: str | None) -> str:
    if not metrics:
        return f"{name}: nothing to do (already at the requested step)"
    k = max(1, min(10, len(metrics) // 4))
    first = [m["reward"] for m in metrics[:k] if "reward" in m]
    last = [m["reward"] for m in metrics[-k:] if "reward" in m]
    text = f"{name}: {metrics[-1]['step']} steps"
    if first and last:
        text += f"; reward {sum(first) / len(first):.4g} (first {k}) -> {sum(last) / len(last):.4g} (last {k})"
    for key in ("eval_accuracy", "eval_return"):
        values = [m[key] for m in metrics if key in m]
        if values:
            text += f"; {key} {values[-1]:.4g}"
    if out:
        text += f"; metrics, curves.png and checkpoint in {out}"
    return text


def run_demo(args) -> int:
    from . import MissingExtra, check_extras, make_config
    from .demo import demo

    try:
        check_extras("ppo-rlhf", make_config("ppo-rlhf"), args.out)
    except MissingExtra as exc:
        print(f"rlkernels demo: {exc}", file=sys.stderr)
        return 2
    _quiet_transformers()
    demo(out=args.out, steps=args.steps, kernels=args.kernels, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    """`python -m rlkernels.trainers.cli train ...` (the same as `rlkernels train ...`)."""
    parser = argparse.ArgumentParser(prog="rlkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_demo_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
