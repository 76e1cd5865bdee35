"""GRPO (group relative policy optimisation) for a transformers causal LM.

Each step samples `group_size` responses to each of `prompts_per_step` prompts,
scores them (rule or reward model), turns the scores into group-relative advantages
(`group_advantages`: GRPO's (s - mean) / std, Dr. GRPO without the std, or RLOO's
leave-one-out baseline), and minimises the clipped surrogate plus beta times a KL
estimator to the frozen reference (`grpo_loss`, normalised per `loss_type` as TRL
defines it).  No value network."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .base import TrainConfig, Trainer, accumulate, clip_fraction, optimize, stat
from .config import ConfigError
from .data import Prompts
from .lm import ModelConfig, freeze, rollout_forward, sample
from .ppo_rlhf import make_scorer

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GRPOConfig(TrainConfig):
    steps: int = 60
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: str = "rule"            # "rule" or a reward-model run directory
    prompts: str | None = None      # JSONL with a "prompt" key (default: generated prompts)
    negative_prompts: float = 0.0   # generated prompts: fraction asking for a negative review
    prompts_per_step: int = 8
    group_size: int = 4             # samples per prompt
    minibatch_size: int = 8         # samples per optimiser step
    iterations: int = 1             # passes over each batch (GRPO's mu)
    max_new_tokens: int = 12
    temperature: float = 1.0
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    beta: float = 0.02              # KL coefficient (0: no reference model)
    kl: str = "k3"
    loss_type: str = "grpo"
    baseline: str = "mean"          # "mean" (GRPO) or "loo" (RLOO)
    scale: str = "group"            # "group" (GRPO), "batch", "none" (Dr. GRPO)

    def check(self) -> None:
        super().check()
        self._positive("prompts_per_step", "group_size", "minibatch_size", "iterations", "max_new_tokens",
                       "temperature", "lr", "max_grad_norm")
        self._non_negative("beta")
        self._in_unit("negative_prompts")
        self._in_unit("clip_low", closed=False)
        if self.group_size < 2:
            raise ConfigError("group_size", f"group-relative advantages need group_size >= 2, got {self.group_size}")
        samples = self.prompts_per_step * self.group_size
        if self.minibatch_size > samples or samples % self.minibatch_size:
            raise ConfigError("minibatch_size", f"minibatch_size={self.minibatch_size} must divide "
                                                f"prompts_per_step * group_size = {samples}")
        self._one_of("loss_type", LOSS_TYPES)
        self._one_of("kl", ("k1", "k2", "k3"))
        self._one_of("baseline", ("mean", "loo"))
        self._one_of("scale", ("group", "batch", "none"))


class GRPOTrainer(Trainer):
    name = "grpo"
    config_class = GRPOConfig
    plot_keys = ("reward", "loss", "kl", "entropy")

    def setup(self) -> None:
        from .lm import build_lm

        cfg: GRPOConfig = self.config
        self.policy, self.tokenizer = build_lm(cfg.model, seed=cfg.seed, device=self.device)
        self.reference = freeze(copy.deepcopy(self.policy)) if cfg.beta > 0 else None
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.scorer = make_scorer(cfg.reward, self.device)
        self.prompts = Prompts(cfg.prompts, negative_fraction=cfg.negative_prompts)

    def modules(self):
        return {"policy": self.policy}

    def optimizers(self):
        return {"optimizer": self.optimizer}

    def _logprobs(self, model, rollout, entropy=False):
        cfg = self.config
        return rollout_forward(self.ops, model, rollout, temperature=cfg.temperature, entropy=entropy,
                               fused=cfg.model.fused_head)

    def train_step(self) -> dict:
        cfg = self.config
        ops = self.ops
        prompts = [p for p in self.prompts.batch(cfg.prompts_per_step, self.rng) for _ in range(cfg.group_size)]
        rollout = sample(self.policy, self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, device=self.device)
        scores = self.scorer(rollout.prompts, rollout.responses).to(self.device).float()
        advantages, all_equal = ops.group_advantages(scores, cfg.group_size, baseline=cfg.baseline, scale=cfg.scale)
        N = len(prompts)
        on_policy = cfg.iterations == 1 and cfg.minibatch_size == N  # ratio 1: no old log-probs needed
        with torch.no_grad():
            old_logprobs = None if on_policy else self._logprobs(self.policy, rollout)
            ref_logprobs = self._logprobs(self.reference, rollout) if self.reference is not None else None
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.iterations):
            order = torch.randperm(N, generator=self.generator).to(self.device)
            for start in range(0, N, cfg.minibatch_size):
                index = order[start:start + cfg.minibatch_size]
                part = rollout.select(index)
                logprobs, entropy = self._logprobs(self.policy, part, entropy=True)
                loss, stats = ops.grpo_loss(logprobs, None if old_logprobs is None else old_logprobs[index],
                                            advantages[index], part.mask,
                                            ref_logprobs=None if ref_logprobs is None else ref_logprobs[index],
                                            beta=cfg.beta, kl=cfg.kl, loss_type=cfg.loss_type,
                                            clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                            max_completion_length=cfg.max_new_tokens)
                grad_norm = optimize(self.optimizer, loss, self.policy.parameters(), cfg.max_grad_norm)
                updates += 1
                accumulate(sums, {"loss": loss, "entropy": ops.masked_mean(entropy.detach(), part.mask),
                                  "grad_norm": grad_norm, "clipfrac": clip_fraction(stats),
                                  "kl": stat(stats, "kl") if ref_logprobs is not None else None})
        metrics = {k: v / updates for k, v in sums.items()}
        metrics.update(reward=scores.mean(), score_std=scores.std(), zero_variance_groups=all_equal.float().mean(),
                       response_length=rollout.mask.float().sum(-1).mean())
        return metrics
