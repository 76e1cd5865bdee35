"""Thin trainers that show the kernels in a training run: models, generation and
optimisers are plain PyTorch and transformers; every hot computation (log-probs,
entropy, KL, advantages, losses, averaging) goes through the public rlkernels ops,
or through their pure-PyTorch references with kernels="reference".

    from rlkernels.trainers import train
    metrics = train("ppo-rlhf", {"steps": 30}, out="runs/ppo-rlhf")

Trainers: reward-model, ppo-rlhf, grpo, dpo, ppo (classic control), decentralized
(multi-agent PPO over torch.distributed).  The command line is `rlkernels train`."""
from __future__ import annotations

import importlib
import os

from .config import ConfigError

# name -> (module, trainer class, config class)
_REGISTRY = {
    "reward-model": ("reward_model", "RewardModelTrainer", "RewardModelConfig"),
    "ppo-rlhf": ("ppo_rlhf", "PPORLHFTrainer", "PPORLHFConfig"),
    "grpo": ("grpo", "GRPOTrainer", "GRPOConfig"),
    "dpo": ("dpo", "DPOTrainer", "DPOConfig"),
    "ppo": ("ppo", "PPOTrainer", "PPOConfig"),
    "decentralized": ("decentralized", "DecentralizedPPOTrainer", "DecentralizedConfig"),
}
TRAINERS = tuple(_REGISTRY)
# Trainers whose model is a GPT-2 built with transformers (the others are small torch networks)
_LANGUAGE_MODEL_TRAINERS = ("reward-model", "ppo-rlhf", "grpo", "dpo")


class MissingExtra(ImportError):
    """A trainer needs a package of the `train` extra that is not importable."""


def missing_packages(name: str, config, out: str | None) -> list[str]:
    """The packages of the `train` extra that trainer `name` with this config and output
    directory would import but cannot, each with what it is for."""
    needs = []
    if name in _LANGUAGE_MODEL_TRAINERS:
        needs.append(("transformers", "the model and tokenizer"))
    if out:
        needs.append(("safetensors", "the checkpoint"))
        if getattr(config, "plot", False):
            needs.append(("matplotlib", "curves.png"))
    missing = []
    for module, use in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{module} ({use})")
    return missing


def check_extras(name: str, config, out: str | None) -> None:
    """Raises MissingExtra, in one line naming the `train` extra, when the run would
    stop for want of one of its packages; called before any work starts."""
    missing = missing_packages(name, config, out)
    if missing:
        only_plot = all(m.startswith("matplotlib") for m in missing)
        hint = " (or set plot=false to run without curves.png)" if only_plot else ""
        raise MissingExtra(f"needs {', '.join(missing)}, which the train extra installs: "
                           f"pip install 'rlkernels[train]'{hint}")


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown trainer {name!r}; choose one of {', '.join(TRAINERS)}")
    module, trainer, config = _REGISTRY[name]
    mod = importlib.import_module(f".{module}", __name__)
    return getattr(mod, trainer), getattr(mod, config)


def trainer_class(name: str):
    return _lookup(name)[0]


def config_class(name: str):
    return _lookup(name)[1]


def make_config(name: str, *sources: dict):
    """The trainer's config from dicts merged left to right (unknown keys raise ConfigError)."""
    from .config import build

    return build(config_class(name), *sources)


def saved_config(name: str, out: str) -> dict:
    """The config a previous run of `name` saved in `out` (for resuming); CheckpointError
    (a ValueError naming the file) when there is none, another trainer wrote it, or it
    does not hold a valid config for this trainer."""
    from .checkpoint import STATE_JSON, CheckpointError, read_state

    path = os.path.join(out, "agent0", "checkpoint") if name == "decentralized" else os.path.join(out, "checkpoint")
    config = read_state(path, trainer=name)["config"]
    try:
        config_class(name).from_dict(config)
    except ConfigError as exc:
        raise CheckpointError(os.path.join(path, STATE_JSON), f"holds a config this trainer cannot use ({exc})") from None
    return config


def train(name: str, config=None, out: str | None = None, *, resume: bool = False, steps: int | None = None) -> list[dict]:
    """Runs trainer `name` and returns the metrics of the steps run (agent 0's for
    the decentralized trainer)."""
    if config is None or isinstance(config, dict):
        config = make_config(name, config or {})
    check_extras(name, config, out)
    if name == "decentralized":
        from .decentralized import train_decentralized

        return train_decentralized(config, out, resume=resume, steps=steps)
    trainer = trainer_class(name)(config, out)
    trainer.run(steps, resume=resume)
    return trainer.metrics


__all__ = ["TRAINERS", "ConfigError", "MissingExtra", "check_extras", "config_class", "make_config", "saved_config", "train", "trainer_class"]
