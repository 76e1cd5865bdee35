"""Machinery every trainer shares, written once: the common config fields, the step
loop with a progress bar, metrics as JSONL (one object per step with `step` and
`reward`), a PNG of the curves, safetensors checkpoints and exact resume.

A trainer subclasses `Trainer` and provides `setup()` (models, optimisers, data),
`train_step()` (one update, returning its metrics) and, when it keeps state outside
its modules and optimisers (environments, data cursors), `extra_state()` /
`load_extra_state()`.  Resuming restores modules, optimisers, RNG streams and that
extra state, so the next step equals the one an uninterrupted run would take."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoint import MAX_STEPS
from .config import Config, ConfigError
from .kernels import KERNEL_SETS, Kernels

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
MAX_METRICS_BYTES = 1 << 30


@dataclass
class TrainConfig(Config):
    steps: int = 100           # optimisation steps (one rollout + update each for RL trainers)
    seed: int = 0
    kernels: str = "rlkernels"  # "rlkernels" or "reference" (pure PyTorch, same trainer code)
    device: str = "auto"        # "auto", "cpu", "cuda", "cuda:1", ...
    save_every: int = 0         # checkpoint every k steps (0: only at the end; needs an output dir)
    progress: bool = True       # tqdm progress bar with live metrics
    plot: bool = True           # write curves.png at the end (needs matplotlib)
    threads: int = 1            # torch CPU threads while training (0: leave torch's setting); the embedded
                                # models are too small to gain from more, and on busy cores
                                # multi-threaded small ops stall for whole scheduler slices

    def check(self) -> None:
        super().check()
        self._positive("steps")
        self._at_most("steps", MAX_STEPS)
        self._non_negative("save_every", "threads", "seed")
        self._at_most("seed", MAX_SEED)
        self._at_most("threads", MAX_THREADS)
        self._one_of("kernels", KERNEL_SETS)
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("device", f"must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError("device", f"must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}") from None


MAX_SEED = 2 ** 63 - 1   # torch.manual_seed's range (agents add small offsets to it)
MAX_THREADS = 1024


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("device", f"{name!r} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def _scalar(value):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def stat(stats, key: str):
    """A scalar from an op's stats (a dict or a named tuple), or None when absent."""
    if stats is None:
        return None
    value = stats.get(key) if isinstance(stats, dict) else getattr(stats, key, None)
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return None
    return value


def clip_fraction(stats):
    """Share of tokens where the PPO clip binds (upper + lower side), from ppo_loss stats."""
    parts = [stat(stats, k) for k in ("clip_frac_upper", "clip_frac_lower")]
    return None if any(p is None for p in parts) else parts[0] + parts[1]


def accumulate(sums: dict, values: dict) -> None:
    """Adds scalar metrics (tensors or numbers; None skipped) into running sums."""
    for key, value in values.items():
        if value is not None:
            sums[key] = sums.get(key, 0.0) + float(_scalar(value))


def optimize(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, max_grad_norm: float) -> torch.Tensor:
    """One update on `loss`: gradients cleared, back-propagated, clipped to a total norm
    of `max_grad_norm` over `params` and applied.  Returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return grad_norm


class Trainer:
    """Base class; see the module docstring."""

    name = "trainer"
    config_class = TrainConfig
    plot_keys: tuple[str, ...] = ("reward", "loss", "kl")

    def __init__(self, config: TrainConfig | dict | None = None, out: str | None = None, *,
                 kernels: str | None = None):
        if config is None or isinstance(config, dict):
            config = self.config_class.from_dict(config or {})
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name}: config must be a {self.config_class.__name__}, got {type(config).__name__}")
        if kernels is not None:
            config = config.replace(kernels=kernels)
        self.config = config
        self.out = out
        self.ops = Kernels(config.kernels)
        self.device = resolve_device(config.device)
        self.step = 0
        self.metrics: list[dict] = []
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        with self.cpu_threads():
            self.setup()

    @contextlib.contextmanager
    def cpu_threads(self):
        """Runs the block with config.threads torch threads, restoring the caller's."""
        previous = torch.get_num_threads()
        if self.config.threads and self.config.threads != previous:
            torch.set_num_threads(self.config.threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    # -------------------------------------------------------------- to override
    def setup(self) -> None:
        raise NotImplementedError

    def train_step(self) -> dict:
        raise NotImplementedError

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, json-able values) beyond modules, optimisers and RNG streams."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        pass

    def check_extra_state(self, tensors: dict[str, torch.Tensor], values: dict, tensor_file: str,
                          json_file: str) -> None:
        """Raises CheckpointError unless load_extra_state can take (tensors, values)
        whole; runs before anything is loaded.  The default demands the layout of this
        trainer's own extra_state(); override to check values too."""
        from .checkpoint import check_extra

        own_tensors, own_values = self.extra_state()
        check_extra(tensors, values, own_tensors, own_values, tensor_file, json_file)

    def summary(self) -> dict:
        """A few numbers that describe the run, for the CLI's final line."""
        if not self.metrics:
            return {}
        first, last = self.metrics[0], self.metrics[-1]
        out = {"steps": last["step"]}
        if "reward" in first:
            k = max(1, min(10, len(self.metrics) // 4))
            out["reward_first"] = sum(m["reward"] for m in self.metrics[:k]) / k
            out["reward_last"] = sum(m["reward"] for m in self.metrics[-k:]) / k
        return out

    # -------------------------------------------------------------- the loop
    def run(self, steps: int | None = None, *, resume: bool = False,
            callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Trains until `steps` (default config.steps) steps are done; returns the metrics
        of the steps run now.  resume=True continues from the checkpoint in `out`."""
        with self.cpu_threads():
            return self._run(self.config.steps if steps is None else steps, resume, callback)

    def _run(self, total: int, resume: bool, callback) -> list[dict]:
        if resume:
            self.load_checkpoint()
        elif self.step == 0 and self.out:
            reset_out(self.out)
        bar = self._progress(total)
        new: list[dict] = []
        try:
            while self.step < total:
                start = time.perf_counter()
                metrics = {k: _scalar(v) for k, v in self.train_step().items()}
                self.step += 1
                record = {"step": self.step, **metrics, "step_time": time.perf_counter() - start}
                self.metrics.append(record)
                new.append(record)
                self._log(record)
                if callback is not None:
                    callback(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("reward", "loss", "kl", "accuracy")
                                     if isinstance(record.get(k), float)})
                if self.out and self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if self.out:
            self.save_checkpoint()
            if self.config.plot:
                self.plot()
        return new

    def _progress(self, total: int):
        if not self.config.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the train extra
            return None
        return tqdm(total=total, initial=self.step, desc=self.name, dynamic_ncols=True)

    def _log(self, record: dict) -> None:
        if not self.out:
            return
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, METRICS_FILE), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def plot(self) -> str | None:
        from .plot import save_curves

        records = read_metrics(os.path.join(self.out, METRICS_FILE))
        return save_curves(records, os.path.join(self.out, PLOT_FILE), keys=self.plot_keys, title=self.name)

    # -------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> str:
        if not self.out:
            raise ValueError(f"{self.name}: checkpoints need an output directory (out=...)")
        return os.path.join(self.out, CHECKPOINT_DIR)

    def save_checkpoint(self, path: str | None = None) -> str:
        from .checkpoint import save

        path = path or self.checkpoint_dir
        tensors, values = self.extra_state()
        save(path, trainer=self.name, step=self.step, config=self.config.to_dict(),
             modules=self.modules(), optimizers=self.optimizers(), extra_tensors=tensors, extra_values=values,
             python_rng=self.rng.getstate(), generator=self.generator)
        return path

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restores the checkpoint in `path` (default: out/checkpoint) whole, or raises
        CheckpointError (a ValueError naming the file) with nothing changed: neither the
        trainer nor the files in `out`."""
        self.apply_checkpoint(self.read_checkpoint(path))

    def read_checkpoint(self, path: str | None = None):
        """Reads and checks everything a resume needs (checkpoint files and the metrics
        log); changes nothing.  The result goes to apply_checkpoint()."""
        from .checkpoint import read

        loaded = read(path or self.checkpoint_dir, trainer=self.name, modules=self.modules(),
                      optimizers=self.optimizers(), generator=self.generator)
        self.check_extra_state(loaded.extra_tensors, loaded.extra_values, loaded.tensor_file, loaded.json_file)
        if self.out:
            metrics_path = os.path.join(self.out, METRICS_FILE)
            loaded.metrics = (metrics_path, [m for m in read_metrics(metrics_path) if m["step"] <= loaded.step])
        return loaded

    def apply_checkpoint(self, loaded) -> None:
        state = loaded.apply()
        self.step = state["step"]
        self.rng.setstate(state["python_rng"])
        self.load_extra_state(state["extra_tensors"], state["extra_values"])
        if loaded.metrics is not None:
            metrics_path, kept = loaded.metrics
            with open(metrics_path, "w", encoding="utf-8") as fh:
                for record in kept:
                    fh.write(json.dumps(record) + "\n")
            self.metrics = kept


# The metrics that summary() and the CLI's final line compute with.
SUMMARY_KEYS = ("reward", "eval_accuracy", "eval_return")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics log (none when it does not exist); CheckpointError
    naming the file and line when it is not one JSON object with an integer step per line."""
    from .checkpoint import CheckpointError, read_regular_file

    if not os.path.lexists(path):
        return []
    records = []
    # only a regular file in the run folder: resuming rewrites it
    text = read_regular_file(path, MAX_METRICS_BYTES, root=os.path.dirname(os.path.abspath(path)))
    text = text.decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise CheckpointError(path, f"line {number} is not JSON") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise CheckpointError(path, f"line {number} is not a JSON object with an integer 'step'")
        for key in SUMMARY_KEYS:  # the values the run's summary adds up
            value = record.get(key)
            if key in record and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CheckpointError(path, f"line {number}: '{key}' is {value!r:.40}, not a number")
        records.append(record)
    return records


def reset_out(out: str) -> None:
    """Clears a previous run's metrics, plot and checkpoint from `out` (a fresh run)."""
    for name in (METRICS_FILE, PLOT_FILE):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(out, CHECKPOINT_DIR), ignore_errors=True)
