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
    if name == "decentralized":
        from .decentralized import train_decentralized

        return train_decentralized(config, out, resume=resume, steps=steps)
    trainer = trainer_class(name)(config, out)
    trainer.run(steps, resume=resume)
    return trainer.metrics


__all__ = ["TRAINERS", "ConfigError", "config_class", "make_config", "saved_config", "train", "trainer_class"]
