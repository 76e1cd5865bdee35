"""The `train` and `demo` subcommands of `rlkernels` (rlkernels/cli.py wires them in)."""
from __future__ import annotations

import argparse
import os
import sys

from . import TRAINERS
from .config import ConfigError
from .kernels import KERNEL_SETS

DEFAULT_COMPARE_STEPS = 5


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


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


# ---------------------------------------------------------------- checks of flags, before anything runs
class FlagError(ValueError):
    """A command-line flag with a value that cannot work; names the flag."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


def check_out_dir(path: str, flag: str = "--out") -> str:
    """FlagError unless `path` is a directory, or can be created as one, that this
    process can write into.  Creates nothing (a probe file in the nearest existing
    directory is removed at once)."""
    import tempfile

    if not path or not path.strip():
        raise FlagError(flag, "must name a directory, got an empty string")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FlagError(flag, f"{path} exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FlagError(flag, f"{path} cannot be created: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rlkernels-write-check-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise FlagError(flag, f"{path} is not writable: cannot create files in {existing} ({exc.strerror})") from None
    return path


def check_run_files(out: str, flag: str = "--out") -> None:
    """FlagError when a file the run replaces in `out` (metrics log, plot, checkpoint
    folder) exists as something else, which a fresh run could not clear or write."""
    from .base import CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE

    for name, want_dir in ((METRICS_FILE, False), (PLOT_FILE, False), (CHECKPOINT_DIR, True)):
        path = os.path.join(out, name)
        if not os.path.lexists(path) or os.path.islink(path):
            continue
        if os.path.isdir(path) != want_dir or not (want_dir or os.path.isfile(path)):
            kind = "a directory" if want_dir else "a regular file"
            raise FlagError(flag, f"{path} exists but is not {kind}; move it away or choose another --out")


def check_steps(steps: int | None, flag: str = "--steps") -> None:
    from .base import MAX_STEPS

    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise FlagError(flag, f"must be an integer from 1 to {MAX_STEPS}, got {steps}")


def check_train_flags(args) -> None:
    """The flags of `rlkernels train` that can be judged on their own."""
    from .base import MAX_SEED

    check_steps(args.steps)
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise FlagError("--seed", f"must be an integer from 0 to 2**63 - 1, got {args.seed}")
    if args.device is not None and not args.device.strip():
        raise FlagError("--device", "must be auto, cpu, cuda or cuda:<index>, got an empty string")
    if args.config is not None and not args.config.strip():
        raise FlagError("--config", "must name a file, got an empty string")
    if args.compare and args.resume:
        raise FlagError("--compare", "starts fresh runs; drop --resume")


def check_device(device: str) -> None:
    """ConfigError naming the device key unless torch can place the run on it now."""
    from .base import resolve_device

    resolve_device(device)


# The config keys naming data files, and the keys each row of them needs (trainers/data.py).
DATA_FILE_KEYS = {"data": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}


def check_data_files(config) -> None:
    """ConfigError naming the key unless each data file the config names can be read
    whole (a regular UTF-8 file of JSON rows with the needed string keys), before the run
    starts."""
    from . import toy

    for key, row_keys in DATA_FILE_KEYS.items():
        path = getattr(config, key, None)
        if path:
            try:
                toy.load_jsonl(path, keys=row_keys)
            except (ValueError, OSError) as exc:
                raise ConfigError(key, str(exc)) from None


def check_checkpointable(config) -> None:
    """ConfigError naming env for a gymnasium environment: a command-line run always
    saves a checkpoint into its output folder, and those environments cannot be saved
    (the run had trained, then failed at the save).  The Python API runs them without an
    output folder."""
    env = getattr(config, "env", None)
    if isinstance(env, str) and env.startswith("gym:"):
        raise ConfigError("env", f"{env} cannot be checkpointed, and every `rlkernels train` run saves one: run "
                                 "gymnasium environments through the Python API without an output folder "
                                 "(docs/trainers.md), or use cartpole or gridworld here")


def fail(command: str, exc: BaseException) -> int:
    """Prints one line naming the command and the problem; returns exit code 2."""
    print(f"{command}: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def run_train(args) -> int:
    from . import MissingExtra, check_extras, make_config, saved_config, train
    from .checkpoint import CheckpointError
    from .config import ConfigFileError, parse_overrides, read_file

    _quiet_transformers()
    name = args.trainer
    command = f"rlkernels train {name}"
    out = args.out if args.out is not None else os.path.join("runs", name)
    try:
        check_train_flags(args)
        check_out_dir(out)
        check_run_files(out)
        sources = []
        if args.resume:
            try:
                sources.append(saved_config(name, out))
            except CheckpointError as exc:
                raise FlagError("--resume", str(exc)) from None
        if args.config:
            sources.append(read_file(args.config))
        sources.append(parse_overrides(args.set))
        command_line = {"steps": args.steps, "kernels": args.kernels, "seed": args.seed, "device": args.device,
                        "progress": False if args.no_progress else None}
        sources.append({k: v for k, v in command_line.items() if v is not None and not (args.compare and k == "steps")})
        config = make_config(name, *sources)
        check_device(config.device)
        check_data_files(config)
        check_checkpointable(config)
        check_extras(name, config.replace(plot=False) if args.compare else config, out)
    except (ConfigError, ConfigFileError, FlagError, MissingExtra) as exc:
        return fail(command, exc)
    if args.compare:
        from .compare import compare

        compare(name, config.to_dict(), steps=args.steps or DEFAULT_COMPARE_STEPS, out=out)
        return 0
    try:
        metrics = train(name, config, out, resume=args.resume)
    except CheckpointError as exc:  # found before the checkpoint or the run folder changed
        resumed = os.path.abspath(exc.path).startswith(os.path.abspath(out) + os.sep)
        return fail(command, FlagError("--resume", str(exc)) if args.resume and resumed else exc)
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
    try:
        check_steps(args.steps)
        if args.out is not None:
            check_out_dir(args.out)
    except FlagError as exc:
        return fail("rlkernels demo", exc)
    demo(out=args.out, steps=args.steps, kernels=args.kernels, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    """`python -m rlkernels.trainers.cli train ...` (the same as `rlkernels train ...`)."""
    parser = OneLineParser(prog="rlkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_demo_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
