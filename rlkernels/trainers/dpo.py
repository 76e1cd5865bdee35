"""DPO (direct preference optimisation) on (prompt, chosen, rejected) pairs against a
frozen reference model.

Each step scores a batch of pairs: per-token response log-probs under the policy and
the reference (the fused lm-head log-probs), chosen rows then rejected rows, and
`dpo_sequence_loss` takes the whole step from there (both sequence sums, the pair
loss of `kind`: sigmoid, IPO, hinge or robust, and its gradient) in one op.  The logged `reward` is the mean
implicit-reward margin beta * ((pi_c - ref_c) - (pi_r - ref_r)); `eval_accuracy`
is the share of held-out pairs whose chosen response gets the larger implicit reward
(0 at the start, when policy = reference, and 0.5 for a coin flip)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .base import TrainConfig, Trainer, optimize
from .data import Pairs, Prompts
from .lm import (IGNORE_INDEX, ModelConfig, RuleScorer, build_lm, encode_preferences, freeze, hidden_states, sample,
                 sequence_logprobs, token_logprobs)

DPO_KINDS = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class DPOConfig(TrainConfig):
    steps: int = 100
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str | None = None         # JSONL with prompt/chosen/rejected (default: the simulated annotator)
    num_pairs: int = 2048
    eval_pairs: int = 256
    annotator_noise: float = 0.0
    negative_prompts: float = 0.0
    batch_size: int = 32
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    beta: float = 0.1
    kind: str = "sigmoid"
    label_smoothing: float = 0.0
    max_length: int = 48
    eval_every: int = 25
    sample_eval: int = 64           # embedded default: rule score of this many samples at each eval (0: off)
    max_new_tokens: int = 12

    def check(self) -> None:
        super().check()
        self._positive("num_pairs", "batch_size", "lr", "max_grad_norm", "beta", "max_length", "max_new_tokens")
        self._non_negative("eval_pairs", "annotator_noise", "eval_every", "sample_eval")
        # the toy pairs are generated in memory, in Python (a few microseconds each)
        self._at_most("num_pairs", 1 << 22)
        self._at_most("eval_pairs", 1 << 22)
        self._in_unit("label_smoothing", "negative_prompts")
        self._one_of("kind", DPO_KINDS)


class DPOTrainer(Trainer):
    name = "dpo"
    config_class = DPOConfig
    plot_keys = ("reward", "loss", "accuracy", "eval_accuracy", "sample_score")

    def setup(self) -> None:
        cfg: DPOConfig = self.config
        self.policy, self.tokenizer = build_lm(cfg.model, seed=cfg.seed, device=self.device)
        self.reference = freeze(copy.deepcopy(self.policy))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.pairs = Pairs.from_config(cfg)

    def modules(self):
        return {"policy": self.policy}

    def optimizers(self):
        return {"optimizer": self.optimizer}

    def logprobs(self, model, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of chosen and rejected `[B]` each (one forward)."""
        ids, attention, labels = encode_preferences(self.tokenizer, rows, max_length=self.config.max_length,
                                                    device=self.device)
        sums = sequence_logprobs(self.ops, model, ids, attention, labels, fused=self.config.model.fused_head)
        return sums[:len(rows)], sums[len(rows):]

    def token_logprobs(self, model, ids, attention, labels) -> torch.Tensor:
        """Response log-probs per token `[2B, T]` (0 off the responses)."""
        hidden = hidden_states(model, ids, attention)[:, :-1]
        return token_logprobs(self.ops, model, hidden, labels, fused=self.config.model.fused_head)

    def train_step(self) -> dict:
        cfg = self.config
        rows = self.pairs.batch(cfg.batch_size, self.rng)
        ids, attention, labels = encode_preferences(self.tokenizer, rows, max_length=cfg.max_length,
                                                    device=self.device)
        policy_tokens = self.token_logprobs(self.policy, ids, attention, labels)
        with torch.no_grad():
            ref_tokens = self.token_logprobs(self.reference, ids, attention, labels)
        losses, chosen_rewards, rejected_rewards = self.ops.dpo_sequence_loss(
            policy_tokens, ref_tokens, labels != IGNORE_INDEX, beta=cfg.beta, kind=cfg.kind,
            label_smoothing=cfg.label_smoothing)
        loss = losses.mean()
        grad_norm = optimize(self.optimizer, loss, self.policy.parameters(), cfg.max_grad_norm)
        margin = (chosen_rewards - rejected_rewards).detach()
        metrics = {"reward": margin.mean(), "loss": loss.detach(), "accuracy": (margin > 0).float().mean(),
                   "chosen_reward": chosen_rewards.detach().mean(), "rejected_reward": rejected_rewards.detach().mean(),
                   "grad_norm": grad_norm}
        if cfg.eval_every and ((self.step + 1) % cfg.eval_every == 0 or self.step + 1 == cfg.steps):
            metrics.update(self.evaluate())
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out preference accuracy of the implicit reward and, on the embedded
        default, the rule score of fresh samples."""
        cfg = self.config
        out = {}
        rows = self.pairs.eval
        if rows:
            correct = 0
            for i in range(0, len(rows), 128):
                part = rows[i:i + 128]
                pc, pr = self.logprobs(self.policy, part)
                rc, rr = self.logprobs(self.reference, part)
                correct += int(((pc - rc) > (pr - rr)).sum())
            out["eval_accuracy"] = correct / len(rows)
        if cfg.sample_eval and cfg.data is None and cfg.model.name_or_path == "toy":
            import random

            # a fixed prompt set and a forked RNG, so evaluation does not shift training
            prompts = Prompts(None, negative_fraction=cfg.negative_prompts).batch(cfg.sample_eval, random.Random(123))
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(cfg.seed + 99)
                rollout = sample(self.policy, self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                 device=self.device)
            out["sample_score"] = float(RuleScorer()(rollout.prompts, rollout.responses).mean())
        return out
