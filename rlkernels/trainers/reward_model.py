"""Reward model: a scalar head on a transformer trunk, trained on (prompt, chosen,
rejected) pairs with the Bradley-Terry loss  -log sigmoid(r_chosen - r_rejected).

That loss is `rlkernels.dpo_loss` with beta = 1 and zero reference log-probs (DPO's
sigmoid loss on implicit rewards *is* Bradley-Terry), so the trainer calls that op;
label_smoothing gives the conservative variant for noisy annotators.  PPO-RLHF and
GRPO score with the result: `reward = "<this run's output dir>"`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from .base import TrainConfig, Trainer, optimize
from .data import Pairs
from .lm import ModelConfig, RewardModel, RewardScorer, build_lm, encode_preferences, hidden_size, trunk


@dataclass
class RewardModelConfig(TrainConfig):
    steps: int = 150
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str | None = None        # JSONL with prompt/chosen/rejected (default: the simulated annotator)
    num_pairs: int = 2048          # embedded default: training pairs ...
    eval_pairs: int = 256          # ... and held-out pairs
    annotator_noise: float = 0.0   # Bradley-Terry temperature of the simulated annotator (0: always by rule)
    negative_prompts: float = 0.0  # generated prompts: fraction asking for a negative review
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    max_length: int = 48
    eval_every: int = 25

    def check(self) -> None:
        super().check()
        self._positive("num_pairs", "batch_size", "lr", "max_length", "max_grad_norm")
        self._non_negative("eval_pairs", "annotator_noise", "weight_decay", "eval_every")
        self._in_unit("label_smoothing", "negative_prompts")


class RewardModelTrainer(Trainer):
    name = "reward-model"
    config_class = RewardModelConfig
    plot_keys = ("reward", "loss", "accuracy", "eval_accuracy")

    def setup(self) -> None:
        cfg: RewardModelConfig = self.config
        base, self.tokenizer = build_lm(cfg.model, seed=cfg.seed, device=self.device)
        # the trunk starts from the (warmed-up) base model, as RLHF reward models do
        self.model = RewardModel(trunk(base), hidden_size(base)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pairs = Pairs.from_config(cfg)

    def modules(self):
        return {"reward_model": self.model}

    def optimizers(self):
        return {"optimizer": self.optimizer}

    def rewards(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attention, _ = encode_preferences(self.tokenizer, rows, max_length=self.config.max_length,
                                               device=self.device)
        scores = self.model(ids, attention)
        return scores[:len(rows)], scores[len(rows):]

    def train_step(self) -> dict:
        cfg = self.config
        rows = self.pairs.batch(cfg.batch_size, self.rng)
        chosen, rejected = self.rewards(rows)
        zeros = torch.zeros_like(chosen)
        losses, _, _ = self.ops.dpo_loss(chosen, rejected, zeros, zeros, beta=1.0, kind="sigmoid",
                                         label_smoothing=cfg.label_smoothing)
        loss = losses.mean()
        grad_norm = optimize(self.optimizer, loss, self.model.parameters(), cfg.max_grad_norm)
        margin = (chosen - rejected).detach()
        metrics = {"reward": margin.mean(), "loss": loss.detach(), "accuracy": (margin > 0).float().mean(),
                   "grad_norm": grad_norm}
        if cfg.eval_every and self.pairs.eval and ((self.step + 1) % cfg.eval_every == 0 or self.step + 1 == cfg.steps):
            metrics["eval_accuracy"] = self.evaluate()
        return metrics

    @torch.no_grad()
    def evaluate(self, rows: list[dict] | None = None) -> float:
        rows = rows if rows is not None else self.pairs.eval
        correct = 0
        for i in range(0, len(rows), 128):
            chosen, rejected = self.rewards(rows[i:i + 128])
            correct += int((chosen > rejected).sum())
        return correct / max(1, len(rows))


def load_scorer(run_dir: str, *, device="cpu") -> RewardScorer:
    """The reward model a `reward-model` run saved in `run_dir`, ready to score texts."""
    path = os.path.join(run_dir, "checkpoint")
    state = ckpt.read_state(path)
    if state["trainer"] != RewardModelTrainer.name:
        raise ckpt.CheckpointError(os.path.join(path, ckpt.STATE_JSON),
                                   f"{run_dir} holds a {state['trainer']!r} run, not a reward model")
    try:
        cfg = RewardModelConfig.from_dict(dict(state["config"]))
    except ValueError as exc:  # ConfigError
        raise ckpt.CheckpointError(os.path.join(path, ckpt.STATE_JSON),
                                   f"holds a config the reward model cannot use ({exc})") from None
    model_cfg = cfg.model.replace(pretrain_steps=0)  # weights come from the checkpoint
    base, tokenizer = build_lm(model_cfg, seed=cfg.seed, device=device)
    model = RewardModel(trunk(base), hidden_size(base)).to(device)
    ckpt.load_module(model, os.path.join(path, "reward_model.safetensors"))
    return RewardScorer(model, tokenizer, max_length=cfg.max_length, device=device)


__all__ = ["RewardModelConfig", "RewardModelTrainer", "load_scorer"]
