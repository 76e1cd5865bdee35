"""PPO-RLHF for a transformers causal LM.

Each step: sample responses to a batch of prompts with `generate`; score them with
the reward rule or a trained reward model; compute per-token log-probs of the policy
and of the frozen reference, and values from the value head (one forward each);
turn KL to the reference into a per-token penalty (`kl_penalty`) added to the reward,
or keep it as a loss term; GAE with the response mask (`gae`); whiten advantages
(`masked_whiten`); then `ppo_epochs` passes over shuffled minibatches with the clipped
policy loss plus an optional entropy bonus (and the KL when it is a loss term) straight
from the hidden states (`linear_ppo_loss`: the [tokens, vocab] logits never exist; with
model.fused_head = false, `logprobs` on the logits then `ppo_loss`), and the clipped
value loss (`value_loss`).  The entropy bonus and the KL term are aggregated like the
loss (`agg`) on the fused path and as token means on the unfused one (the same for the
default agg="token-mean").  Every tensor computation past the model's hidden states
goes through `self.ops` (rlkernels or the reference kernels)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import TrainConfig, Trainer, accumulate, clip_fraction, optimize, stat
from .config import ConfigError
from .data import Prompts
from .lm import (ModelConfig, RuleScorer, build_lm, freeze, hidden_size, hidden_states, rollout_forward, sample,
                 token_logprobs)

KL_ESTIMATORS = ("k1", "k2", "mse", "k3", "low_var_kl", "abs")
AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class PPORLHFConfig(TrainConfig):
    steps: int = 60
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: str = "rule"            # "rule" (embedded sentiment rule) or a reward-model run directory
    prompts: str | None = None      # JSONL with a "prompt" key (default: generated prompts)
    negative_prompts: float = 0.0   # generated prompts: fraction asking for a negative review
    batch_size: int = 32            # prompts (= responses) per step
    minibatch_size: int = 16
    ppo_epochs: int = 2
    max_new_tokens: int = 12
    temperature: float = 1.0
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_low: float = 0.2
    clip_high: float | None = None  # None: same as clip_low
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_in_reward: bool = True       # False: add kl_coef * KL to the loss instead
    whiten_advantages: bool = True
    agg: str = "token-mean"

    def check(self) -> None:
        super().check()
        self._positive("batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "temperature", "lr",
                       "max_grad_norm")
        self._non_negative("vf_coef", "entropy_coef", "kl_coef")
        self._in_unit("negative_prompts")
        self._in_unit("gamma", "lam")
        self._in_unit("clip_low", closed=False)
        if self.minibatch_size > self.batch_size:
            raise ConfigError("minibatch_size", f"minibatch_size={self.minibatch_size} exceeds batch_size={self.batch_size}")
        self._divides("minibatch_size", "batch_size")
        if self.clip_high is not None and self.clip_high <= 0:
            raise ConfigError("clip_high", f"must be > 0, got {self.clip_high}")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ConfigError("value_clip", f"must be > 0 or null, got {self.value_clip}")
        self._one_of("kl_estimator", KL_ESTIMATORS)
        self._one_of("agg", AGGREGATIONS)
        if self.max_new_tokens + 16 > self.model.n_positions and self.model.name_or_path == "toy":
            raise ConfigError("max_new_tokens", f"max_new_tokens={self.max_new_tokens} plus the prompt does not fit "
                                                f"model.n_positions={self.model.n_positions}")


class ValueHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


def make_scorer(reward: str, device):
    if reward == "rule":
        return RuleScorer()
    from .reward_model import load_scorer

    return load_scorer(reward, device=device)


class PPORLHFTrainer(Trainer):
    name = "ppo-rlhf"
    config_class = PPORLHFConfig
    plot_keys = ("reward", "loss", "kl", "entropy")

    def setup(self) -> None:
        cfg: PPORLHFConfig = self.config
        self.fused = cfg.model.fused_head if cfg.model.fused_head is not None else self.ops.has("linear_ppo_loss")
        self.policy, self.tokenizer = build_lm(cfg.model, seed=cfg.seed, device=self.device)
        self.reference = freeze(copy.deepcopy(self.policy))
        self.value_head = ValueHead(hidden_size(self.policy)).to(self.device)
        params = list(self.policy.parameters()) + list(self.value_head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        self.scorer = make_scorer(cfg.reward, self.device)
        self.prompts = Prompts(cfg.prompts, negative_fraction=cfg.negative_prompts)

    def modules(self):
        return {"policy": self.policy, "value_head": self.value_head}

    def optimizers(self):
        return {"optimizer": self.optimizer}

    def _forward(self, model, rollout, *, entropy=False, values=False):
        cfg = self.config
        return rollout_forward(self.ops, model, rollout, temperature=cfg.temperature, entropy=entropy,
                               fused=self.fused, value_head=self.value_head if values else None)

    @torch.no_grad()
    def collect(self):
        """A rollout with everything the update needs."""
        cfg = self.config
        ops = self.ops
        rollout = sample(self.policy, self.tokenizer, self.prompts.batch(cfg.batch_size, self.rng),
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, device=self.device)
        old_logprobs, entropy, old_values = self._forward(self.policy, rollout, entropy=True, values=True)
        ref_logprobs = self._forward(self.reference, rollout)
        scores = self.scorer(rollout.prompts, rollout.responses).to(self.device).float()
        mask = rollout.mask
        kl = ops.kl_penalty(old_logprobs, ref_logprobs, kind=cfg.kl_estimator)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        rewards = -cfg.kl_coef * kl if cfg.kl_in_reward else torch.zeros_like(kl)
        last = mask.long().sum(-1).clamp(min=1) - 1  # the final token of each response gets the score
        rewards = rewards.scatter_add(1, last[:, None], scores[:, None])
        advantages, returns = ops.gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = ops.masked_whiten(advantages, mask)
        batch = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=old_values,
                     advantages=advantages, returns=returns)
        stats = {"reward": scores.mean(), "kl": ops.masked_mean(kl.sum(-1)), "score_std": scores.std(),
                 "entropy": ops.masked_mean(entropy, mask), "response_length": mask.float().sum(-1).mean()}
        return rollout, batch, stats

    def policy_loss(self, part, index, batch):
        """The policy's share of a minibatch loss (clipped surrogate, entropy bonus, KL
        when it is a loss term) and the values for the value loss."""
        cfg, ops = self.config, self.ops
        mask, labels = part.mask, part.labels()
        states = hidden_states(self.policy, part.sequences, part.attention_mask)[:, part.prompt_length - 1:-1]
        values = self.value_head(states).squeeze(-1).float()
        old, advantages = batch["old_logprobs"][index], batch["advantages"][index]
        kl_term = not cfg.kl_in_reward and cfg.kl_coef > 0
        clip = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.agg)
        if self.fused and (not kl_term or cfg.kl_estimator in ("k1", "k2", "k3")):
            # hidden states -> loss in one op: the [tokens, vocab] logits never exist
            head = self.policy.get_output_embeddings()
            kl_args = dict(ref_logprobs=batch["ref_logprobs"][index], beta=cfg.kl_coef, kl=cfg.kl_estimator) \
                if kl_term else {}
            loss, stats = ops.linear_ppo_loss(states, head.weight, labels, old, advantages, mask, bias=head.bias,
                                              temperature=cfg.temperature, entropy_coef=cfg.entropy_coef,
                                              **kl_args, **clip)
            return loss, stats, values
        out = token_logprobs(ops, self.policy, states, labels, temperature=cfg.temperature,
                             entropy=cfg.entropy_coef != 0, fused=self.fused)
        logprobs, entropy = out if cfg.entropy_coef != 0 else (out, None)
        loss, stats = ops.ppo_loss(logprobs, old, advantages, mask, **clip)
        if entropy is not None:
            loss = loss - cfg.entropy_coef * ops.masked_mean(entropy, mask)
        if kl_term:
            kl = ops.kl_penalty(logprobs, batch["ref_logprobs"][index], kind=cfg.kl_estimator)
            loss = loss + cfg.kl_coef * ops.masked_mean(kl, mask)
        return loss, stats, values

    def train_step(self) -> dict:
        cfg = self.config
        ops = self.ops
        rollout, batch, stats = self.collect()
        sums: dict[str, float] = {}
        updates = 0
        params = list(self.policy.parameters()) + list(self.value_head.parameters())
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=self.generator).to(self.device)
            for start in range(0, cfg.batch_size, cfg.minibatch_size):
                index = order[start:start + cfg.minibatch_size]
                part = rollout.select(index)
                pg_loss, pg_stats, values = self.policy_loss(part, index, batch)
                vf_loss, vf_stats = ops.value_loss(values, batch["old_values"][index], batch["returns"][index],
                                                   part.mask, clip=cfg.value_clip, agg=cfg.agg)
                loss = pg_loss + cfg.vf_coef * vf_loss
                grad_norm = optimize(self.optimizer, loss, params, cfg.max_grad_norm)
                updates += 1
                accumulate(sums, {"loss": loss, "policy_loss": pg_loss, "vf_loss": vf_loss, "grad_norm": grad_norm,
                                  "clipfrac": clip_fraction(pg_stats), "approx_kl": stat(pg_stats, "approx_kl_k1"),
                                  "vf_clipfrac": stat(vf_stats, "clip_frac")})
        return {**stats, **{k: v / updates for k, v in sums.items()}}

