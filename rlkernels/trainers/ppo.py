"""Classic PPO: a policy network and a value network acting in vectorised environments
(CartPole, a grid world, or gymnasium).

Each step collects `rollout_steps` transitions from every environment, computes
advantages with `gae` (episode boundaries as `dones`, bootstrapping the last state's
value), then runs `epochs` passes over shuffled minibatches: action log-probs and
entropy with `logprobs` (the same fused op as for a language model, over the action
"vocabulary"), the clipped surrogate with `ppo_loss`, the value loss with
`value_loss`, advantage normalisation with `masked_whiten`."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from .base import TrainConfig, Trainer, accumulate, clip_fraction, optimize, stat
from .config import ConfigError
from .envs import make_env


# Upper bounds of the sizes a classic-PPO run builds in memory (see PPOConfig.check).
SIZE_LIMITS = {"num_envs": 1 << 20, "rollout_steps": 1 << 20, "hidden": 1 << 13, "grid_size": 1 << 12,
               "epochs": 1 << 16}
MAX_ROLLOUT_SLOTS = 1 << 27


@dataclass
class PPOConfig(TrainConfig):
    steps: int = 30              # updates; each collects num_envs * rollout_steps transitions
    env: str = "cartpole"        # "cartpole", "gridworld" or "gym:<EnvId>"
    grid_size: int = 5
    num_envs: int = 16
    rollout_steps: int = 256
    epochs: int = 4
    minibatches: int = 4
    hidden: int = 64
    lr: float = 2.5e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    lam: float = 0.95
    clip_low: float = 0.2
    clip_high: float | None = None
    value_clip: float | None = None
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True
    eval_episodes: int = 0       # >0: evaluate this many episodes at the end

    def _at_most_product(self, names, limit) -> None:
        product = 1
        for name in names:
            product *= getattr(self, name)
        if product > limit:
            raise ConfigError(names[0], f"{' * '.join(names)} = {product} is more than {limit} (each rollout slot "
                                        "holds an observation, action, reward and value in memory)")

    def check(self) -> None:
        super().check()
        self._positive("num_envs", "rollout_steps", "epochs", "minibatches", "hidden", "lr", "max_grad_norm")
        self._in_unit("gamma", "lam")
        self._in_unit("clip_low", closed=False)
        self._non_negative("vf_coef", "entropy_coef", "eval_episodes")
        batch = self.num_envs * self.rollout_steps
        if self.minibatches > batch or batch % self.minibatches:
            raise ConfigError("minibatches", f"minibatches={self.minibatches} must divide num_envs * rollout_steps = {batch}")
        if not (self.env in ("cartpole", "gridworld") or self.env.startswith("gym:")):
            raise ConfigError("env", f"must be 'cartpole', 'gridworld' or 'gym:<EnvId>', got {self.env!r}")
        if self.env == "gridworld" and self.grid_size < 3:
            raise ConfigError("grid_size", f"must be >= 3, got {self.grid_size}")
        # sizes of the small networks and vectorised environments these trainers build in
        # memory: a typo of a few zeros ends in a refusal, not an allocation traceback
        for name, limit in SIZE_LIMITS.items():
            self._at_most(name, limit)
        self._at_most_product(("num_envs", "rollout_steps"), MAX_ROLLOUT_SLOTS)


def mlp(inputs: int, hidden: int, outputs: int, out_gain: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                        nn.Linear(hidden, outputs))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=2 ** 0.5)
            nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(net[-1].weight, gain=out_gain)
    return net


class ActorCritic(nn.Module):
    """The policy network (action logits) and the value network, kept separate."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: int):
        super().__init__()
        self.policy = mlp(obs_dim, hidden, num_actions, 0.01)
        self.value = mlp(obs_dim, hidden, 1, 1.0)

    def forward(self, obs):
        return self.policy(obs), self.value(obs).squeeze(-1)


class PPOTrainer(Trainer):
    name = "ppo"
    config_class = PPOConfig
    plot_keys = ("reward", "loss", "kl", "entropy")

    def setup(self) -> None:
        cfg: PPOConfig = self.config
        options = {"size": cfg.grid_size} if cfg.env == "gridworld" else {}
        self.env = make_env(cfg.env, cfg.num_envs, self.env_seed(), self.device, **options)
        self.env_options = options
        self.net = ActorCritic(self.env.obs_dim, self.env.num_actions, cfg.hidden).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, eps=1e-5)
        self.obs = self.env.reset()
        self.recent_returns: deque[float] = deque(maxlen=100)

    def env_seed(self) -> int:
        return self.config.seed

    def modules(self):
        return {"actor_critic": self.net}

    def optimizers(self):
        return {"optimizer": self.optimizer}

    def extra_state(self):
        tensors = {f"env/{k}": v for k, v in self.env.state_dict().items()}
        tensors["obs"] = self.obs
        return tensors, {"recent_returns": list(self.recent_returns)}

    def check_extra_state(self, tensors, values, tensor_file, json_file):
        from .checkpoint import CheckpointError

        super().check_extra_state(tensors, values, tensor_file, json_file)
        try:
            self.env.check_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("env/")})
        except ValueError as exc:
            raise CheckpointError(tensor_file, f"extra/env/{exc}") from None

    def load_extra_state(self, tensors, values):
        self.env.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("env/")})
        self.obs = tensors["obs"].to(self.device)
        self.recent_returns = deque(values.get("recent_returns", []), maxlen=100)

    @torch.no_grad()
    def collect(self):
        cfg = self.config
        N, T = cfg.num_envs, cfg.rollout_steps
        obs_buf = torch.empty(N, T, self.env.obs_dim, device=self.device)
        actions = torch.empty(N, T, dtype=torch.long, device=self.device)
        rewards = torch.empty(N, T, device=self.device)
        dones = torch.empty(N, T, dtype=torch.bool, device=self.device)
        finished = []
        obs = self.obs
        for t in range(T):
            obs_buf[:, t] = obs
            logits = self.net.policy(obs)
            action = torch.multinomial(torch.softmax(logits.float(), -1), 1).squeeze(-1)
            obs, reward, done, returns = self.env.step(action)
            actions[:, t], rewards[:, t], dones[:, t] = action, reward, done
            finished.extend(returns.tolist())
        self.obs = obs
        logits, values = self.net(obs_buf)
        old_logprobs = self.ops.logprobs(logits, actions)
        last_values = self.net.value(obs).squeeze(-1)
        advantages, returns = self.ops.gae(rewards, values, dones=dones, last_values=last_values,
                                           gamma=cfg.gamma, lam=cfg.lam)
        self.recent_returns.extend(finished)
        return dict(obs=obs_buf, actions=actions, old_logprobs=old_logprobs, old_values=values,
                    advantages=advantages, returns=returns), finished

    def after_optimizer_step(self) -> None:
        """Hook for subclasses (the decentralized trainer averages here)."""

    def train_step(self) -> dict:
        cfg = self.config
        ops = self.ops
        if cfg.anneal_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * (1.0 - self.step / max(1, cfg.steps))
        batch, finished = self.collect()
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
        M = flat["actions"].shape[0]
        size = M // cfg.minibatches
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(M, generator=self.generator).to(self.device)
            for start in range(0, M, size):
                index = order[start:start + size]
                logits, values = self.net(flat["obs"][index])
                logprobs, entropy = ops.logprobs(logits, flat["actions"][index], entropy=True)
                advantages = flat["advantages"][index]
                if cfg.normalize_advantages:
                    advantages = ops.masked_whiten(advantages)
                # one row of `size` transitions: token-mean aggregation = mean over the minibatch
                pg_loss, pg_stats = ops.ppo_loss(logprobs[None], flat["old_logprobs"][index][None], advantages[None],
                                                 clip_low=cfg.clip_low, clip_high=cfg.clip_high)
                vf_loss, _ = ops.value_loss(values[None], flat["old_values"][index][None], flat["returns"][index][None],
                                            clip=cfg.value_clip)
                entropy_mean = ops.masked_mean(entropy)
                loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy_mean
                optimize(self.optimizer, loss, self.net.parameters(), cfg.max_grad_norm)
                self.after_optimizer_step()
                updates += 1
                accumulate(sums, {"loss": loss, "pg_loss": pg_loss, "vf_loss": vf_loss, "entropy": entropy_mean,
                                  "kl": stat(pg_stats, "approx_kl_k1"), "clipfrac": clip_fraction(pg_stats)})
        metrics = {k: v / updates for k, v in sums.items()}
        recent = list(self.recent_returns)
        # reward: mean return of the episodes that ended in this rollout (the last
        # 100 episodes' mean when none ended, e.g. with long CartPole balances)
        metrics["reward"] = sum(finished) / len(finished) if finished else (sum(recent) / len(recent) if recent else 0.0)
        metrics["return_100"] = sum(recent) / len(recent) if recent else 0.0
        metrics["episodes"] = len(finished)
        if cfg.eval_episodes and self.step + 1 == cfg.steps:
            metrics["eval_return"] = self.evaluate(cfg.eval_episodes)
        return metrics

    @torch.no_grad()
    def evaluate(self, episodes: int = 100, *, greedy: bool = False, seed: int | None = None) -> float:
        """Mean return of `episodes` fresh episodes with the current policy (sampled
        actions, or the most likely ones with greedy=True): one environment per
        episode, each counted once, so short episodes are not over-represented."""
        with self.cpu_threads():
            return self._evaluate(episodes, greedy, seed)

    def _evaluate(self, episodes: int, greedy: bool, seed: int | None) -> float:
        cfg = self.config
        seed = 10_000 + (cfg.seed if seed is None else seed)
        env = make_env(cfg.env, episodes, seed, self.device, **self.env_options)
        obs = env.reset()
        returns = torch.full((episodes,), float("nan"))
        generator = torch.Generator().manual_seed(seed)
        while bool(returns.isnan().any()):
            logits = self.net.policy(obs).float()
            if greedy:
                action = logits.argmax(-1)
            else:
                action = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator).squeeze(-1)
            episode_return = env.episode_return.clone().cpu()
            obs, rewards, dones, _ = env.step(action.to(self.device))
            done = dones.cpu() & returns.isnan()
            returns[done] = (episode_return + rewards.cpu())[done]
        return float(returns.mean())
