"""Vectorised environments for classic PPO, written in torch (all environments of a
batch step together, no Python loop over them):

- `CartPole`: the classic cart-pole balance task with gymnasium's CartPole-v1 physics
  (reward 1 per step, episode ends when the pole passes 12 degrees or the cart leaves
  +-2.4, truncated at 500 steps).  Solved at an average return of 195 over 100 episodes.
- `GridWorld`: a small grid with pits; reach the far corner (+1), avoid pits (-1),
  -0.01 per step, truncated at 4 x size steps.
- `GymEnv`: any discrete-action gymnasium environment, when gymnasium is installed
  (id "gym:<EnvId>").

Every environment resets itself when an episode ends (the returned observation is
then the first of the next episode) and reports the returns of finished episodes.
Truncation is treated as termination.  State (including the RNG) round-trips through
`state_dict()` / `load_state_dict()` so checkpoints resume exactly."""
from __future__ import annotations

import math

import torch


class VecEnv:
    num_envs: int
    obs_dim: int
    num_actions: int
    solved_return: float

    def reset(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(observations [N, obs_dim], rewards [N], dones [N] bool, finished returns [k])."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def check_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Raises ValueError (naming the entry) unless load_state_dict can take `state`,
        whose names, shapes and dtypes are those of state_dict(); changes nothing."""


class _TorchEnv(VecEnv):
    """Episode bookkeeping and RNG shared by the torch environments."""

    max_steps: int

    def __init__(self, num_envs: int, seed: int, device="cpu"):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.episode_return = torch.zeros(num_envs, device=self.device)
        self.episode_length = torch.zeros(num_envs, dtype=torch.long, device=self.device)

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def _finish(self, rewards: torch.Tensor, terminated: torch.Tensor):
        self.episode_return += rewards
        self.episode_length += 1
        dones = terminated | (self.episode_length >= self.max_steps)
        finished = self.episode_return[dones].clone()
        if bool(dones.any()):
            self._reset_where(dones)
            self.episode_return[dones] = 0.0
            self.episode_length[dones] = 0
        return dones, finished

    def _reset_where(self, which: torch.Tensor) -> None:
        raise NotImplementedError

    def _state_names(self) -> tuple[str, ...]:
        return ("episode_return", "episode_length")

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {name: getattr(self, name).clone() for name in self._state_names()}
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._state_names():
            getattr(self, name).copy_(state[name])
        self.generator.set_state(state["generator"])

    def check_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            torch.Generator().set_state(state["generator"])
        except RuntimeError as exc:
            raise ValueError(f"generator is not a valid generator state ({str(exc).splitlines()[0]})") from None
        length = state["episode_length"]
        if length.numel() and not (0 <= int(length.min()) and int(length.max()) <= self.max_steps):
            raise ValueError(f"episode_length must be in [0, {self.max_steps}] (max_steps), got values from "
                             f"{int(length.min())} to {int(length.max())}")


class CartPole(_TorchEnv):
    obs_dim = 4
    num_actions = 2
    solved_return = 195.0
    gravity, masscart, masspole, half_length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_limit = 12 * 2 * math.pi / 360
    x_limit = 2.4

    def __init__(self, num_envs: int = 8, seed: int = 0, device="cpu", max_steps: int = 500):
        super().__init__(num_envs, seed, device)
        self.max_steps = max_steps
        self.state = torch.zeros(num_envs, 4, device=self.device)

    def reset(self) -> torch.Tensor:
        self._reset_where(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        self.episode_return.zero_()
        self.episode_length.zero_()
        return self.state.clone()

    def _reset_where(self, which):
        fresh = self._rand(self.num_envs, 4) * 0.1 - 0.05
        self.state = torch.where(which[:, None], fresh, self.state)

    def step(self, actions):
        x, x_dot, theta, theta_dot = self.state.unbind(-1)
        force = torch.where(actions.to(self.device) == 1, self.force_mag, -self.force_mag)
        cos, sin = torch.cos(theta), torch.sin(theta)
        total_mass = self.masscart + self.masspole
        pole_mass_length = self.masspole * self.half_length
        temp = (force + pole_mass_length * theta_dot ** 2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (
            self.half_length * (4.0 / 3.0 - self.masspole * cos ** 2 / total_mass))
        x_acc = temp - pole_mass_length * theta_acc * cos / total_mass
        x = x + self.tau * x_dot
        x_dot = x_dot + self.tau * x_acc
        theta = theta + self.tau * theta_dot
        theta_dot = theta_dot + self.tau * theta_acc
        self.state = torch.stack((x, x_dot, theta, theta_dot), -1)
        terminated = (x.abs() > self.x_limit) | (theta.abs() > self.theta_limit)
        rewards = torch.ones(self.num_envs, device=self.device)
        dones, finished = self._finish(rewards, terminated)
        return self.state.clone(), rewards, dones, finished

    def _state_names(self):
        return super()._state_names() + ("state",)


class GridWorld(_TorchEnv):
    """size x size grid, start (0, 0), goal (size-1, size-1), pits on a diagonal band
    that leaves a path; actions 0..3 = up, down, left, right; observation one-hot."""

    num_actions = 4
    step_cost = 0.01

    def __init__(self, num_envs: int = 8, seed: int = 0, device="cpu", size: int = 5):
        if size < 3:
            raise ValueError(f"GridWorld size must be >= 3, got {size}")
        super().__init__(num_envs, seed, device)
        self.size = size
        self.obs_dim = size * size
        self.max_steps = 4 * size
        self.position = torch.zeros(num_envs, 2, dtype=torch.long, device=self.device)
        pits = torch.zeros(size, size, dtype=torch.bool)
        for i in range(1, size - 1):
            if i % 2 == 1:
                pits[i, size - 1 - i] = True  # anti-diagonal cells, every other one
        pits[0, 0] = pits[size - 1, size - 1] = False
        self.pits = pits.to(self.device)
        # best return: shortest path (2 * (size - 1) moves), the last one onto the goal
        self.solved_return = 1.0 - self.step_cost * (2 * (size - 1) - 1) - 0.05

    def _obs(self):
        index = self.position[:, 0] * self.size + self.position[:, 1]
        return torch.nn.functional.one_hot(index, self.obs_dim).float()

    def reset(self):
        self.position.zero_()
        self.episode_return.zero_()
        self.episode_length.zero_()
        return self._obs()

    def _reset_where(self, which):
        self.position[which] = 0

    def step(self, actions):
        moves = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]], device=self.device)
        self.position = (self.position + moves[actions.to(self.device).long()]).clamp(0, self.size - 1)
        row, col = self.position.unbind(-1)
        at_goal = (row == self.size - 1) & (col == self.size - 1)
        in_pit = self.pits[row, col]
        rewards = torch.full((self.num_envs,), -self.step_cost, device=self.device)
        rewards = torch.where(at_goal, torch.ones_like(rewards), rewards)
        rewards = torch.where(in_pit, -torch.ones_like(rewards), rewards)
        dones, finished = self._finish(rewards, at_goal | in_pit)
        return self._obs(), rewards, dones, finished

    def _state_names(self):
        return super()._state_names() + ("position",)


class GymEnv(VecEnv):
    """A gymnasium vector environment behind the same interface (discrete actions)."""

    def __init__(self, env_id: str, num_envs: int = 8, seed: int = 0, device="cpu"):
        try:
            import gymnasium
        except ImportError as exc:
            raise ImportError(f"env 'gym:{env_id}' needs gymnasium (pip install gymnasium)") from exc
        self.env = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make(env_id) for _ in range(num_envs)])
        space = self.env.single_action_space
        if not hasattr(space, "n"):
            raise ValueError(f"gym:{env_id} has a non-discrete action space; classic PPO here needs discrete actions")
        self.num_envs, self.num_actions = num_envs, int(space.n)
        self.obs_dim = int(math.prod(self.env.single_observation_space.shape))
        self.device = torch.device(device)
        spec = gymnasium.spec(env_id)
        self.solved_return = float(spec.reward_threshold) if spec.reward_threshold is not None else math.inf
        self.seed = seed
        self.episode_return = torch.zeros(num_envs)

    def _tensor(self, array):
        return torch.as_tensor(array, dtype=torch.float32).reshape(self.num_envs, -1).to(self.device)

    def reset(self):
        obs, _ = self.env.reset(seed=self.seed)
        self.episode_return.zero_()
        return self._tensor(obs)

    def step(self, actions):
        obs, rewards, terminated, truncated, _ = self.env.step(actions.cpu().numpy())
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        dones = torch.as_tensor(terminated | truncated)
        self.episode_return += rewards
        finished = self.episode_return[dones].clone()
        self.episode_return[dones] = 0.0
        return self._tensor(obs), rewards.to(self.device), dones.to(self.device), finished

    def state_dict(self):
        raise NotImplementedError("gymnasium environments cannot be checkpointed; resume needs a built-in env")

    def load_state_dict(self, state):
        raise NotImplementedError("gymnasium environments cannot be checkpointed; resume needs a built-in env")


ENVS = ("cartpole", "gridworld")


def make_env(name: str, num_envs: int, seed: int, device="cpu", **options) -> VecEnv:
    """'cartpole', 'gridworld' or 'gym:<EnvId>'."""
    if name == "cartpole":
        return CartPole(num_envs, seed, device, **options)
    if name == "gridworld":
        return GridWorld(num_envs, seed, device, **options)
    if name.startswith("gym:"):
        return GymEnv(name[4:], num_envs, seed, device)
    raise ValueError(f"unknown env {name!r}; use one of {ENVS} or 'gym:<EnvId>'")
