"""Classic PPO and decentralized multi-agent PPO: the vectorised environments, a few
steps of each trainer, exact resume, CartPole solved, and agents that end every
averaging round identical when run as 2 processes under gloo."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from rlkernels import trainers
from rlkernels.trainers.checkpoint import load_module_state
from rlkernels.trainers.envs import CartPole, GridWorld, make_env

TINY_PPO = {"num_envs": 4, "rollout_steps": 16, "epochs": 2, "minibatches": 2, "progress": False, "plot": False}


# ---------------------------------------------------------------- environments
def test_cartpole_physics_and_resets():
    env = CartPole(num_envs=256, seed=0)
    obs = env.reset()
    assert obs.shape == (256, 4) and obs.abs().max() <= 0.05
    # one step by hand (gymnasium's CartPole-v1 equations, Euler integration)
    x, x_dot, theta, theta_dot = obs[0].double().tolist()
    force = 10.0
    temp = (force + 0.05 * theta_dot ** 2 * math.sin(theta)) / 1.1
    theta_acc = (9.8 * math.sin(theta) - math.cos(theta) * temp) / (0.5 * (4 / 3 - 0.1 * math.cos(theta) ** 2 / 1.1))
    x_acc = temp - 0.05 * theta_acc * math.cos(theta) / 1.1
    expected = [x + 0.02 * x_dot, x_dot + 0.02 * x_acc, theta + 0.02 * theta_dot, theta_dot + 0.02 * theta_acc]
    obs, rewards, dones, finished = env.step(torch.ones(256, dtype=torch.long))
    torch.testing.assert_close(obs[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert rewards.eq(1).all() and not dones.any() and finished.numel() == 0
    # a random policy balances ~22 steps on average (the textbook number)
    returns = []
    generator = torch.Generator().manual_seed(0)
    while len(returns) < 500:
        _, _, _, finished = env.step(torch.randint(0, 2, (256,), generator=generator))
        returns.extend(finished.tolist())
    assert 17 < sum(returns) / len(returns) < 28


def test_cartpole_truncates_and_round_trips_state():
    env = CartPole(num_envs=2, seed=1, max_steps=5)
    env.reset()
    env.state.zero_()  # perfectly balanced: only the step limit ends the episode
    env.step(torch.tensor([0, 1]))
    state = env.state_dict()
    twin = CartPole(num_envs=2, seed=99, max_steps=5)
    twin.load_state_dict(state)
    for _ in range(4):
        a = env.step(torch.tensor([0, 1]))
        b = twin.step(torch.tensor([0, 1]))
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert a[2].all() and a[3].tolist() == [5.0, 5.0]


def test_gridworld_paths():
    env = GridWorld(num_envs=2, seed=0, size=5)
    env.reset()
    # env 0 walks the shortest safe path (down the left edge, then right); env 1 walks into the pit at (1, 3)
    plan = [(1, 3), (1, 3), (1, 3), (1, 1), (3, 0), (3, 0), (3, 0), (3, 0)]
    total, done_at = torch.zeros(2), [None, None]
    for t, (a0, a1) in enumerate(plan):
        _, rewards, dones, _ = env.step(torch.tensor([a0, a1]))
        for i in range(2):
            if done_at[i] is None:
                total[i] += rewards[i]
                if dones[i]:
                    done_at[i] = t
    assert done_at[0] == 7 and total[0].item() == pytest.approx(1 - 0.01 * 7)
    assert total[0] > env.solved_return
    assert done_at[1] == 3 and total[1].item() == pytest.approx(-1 - 0.03)
    with pytest.raises(ValueError, match="unknown env"):
        make_env("pong", 1, 0)


# ---------------------------------------------------------------- classic PPO
@pytest.mark.parametrize("env", ["cartpole", "gridworld"])
def test_ppo_runs_and_writes_outputs(env, tmp_path):
    out = str(tmp_path / env)
    metrics = trainers.train("ppo", {**TINY_PPO, "env": env, "steps": 2, "plot": True}, out)
    assert [m["step"] for m in metrics] == [1, 2]
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        assert all("reward" in json.loads(line) for line in fh)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000


def test_ppo_resume_gives_the_uninterrupted_steps(tmp_path):
    config = {**TINY_PPO, "steps": 4}
    straight = trainers.trainer_class("ppo")(config, str(tmp_path / "a"))
    straight.run()
    trainers.trainer_class("ppo")(config, str(tmp_path / "b")).run(steps=2)
    resumed = trainers.trainer_class("ppo")(config, str(tmp_path / "b"))
    new = resumed.run(resume=True)
    drop = lambda m: {k: v for k, v in m.items() if k != "step_time"}  # noqa: E731
    assert [drop(m) for m in new] == [drop(m) for m in straight.metrics[2:]]
    for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)


def test_ppo_reference_kernels_give_the_same_first_step():
    fast = trainers.train("ppo", {**TINY_PPO, "steps": 1})[0]
    ref = trainers.train("ppo", {**TINY_PPO, "steps": 1, "kernels": "reference"})[0]
    for key, value in fast.items():
        if key != "step_time":
            assert ref[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_ppo_solves_cartpole():
    """CartPole counts as solved at an average return of 195 over 100 episodes."""
    trainer = trainers.trainer_class("ppo")({"steps": 30, "progress": False, "plot": False})
    trainer.run()
    assert trainer.metrics[-1]["return_100"] >= 195, [m["return_100"] for m in trainer.metrics]
    assert trainer.evaluate(100) >= 195


def test_ppo_learns_the_gridworld():
    trainer = trainers.trainer_class("ppo")({"env": "gridworld", "steps": 15, "num_envs": 8, "rollout_steps": 64,
                                             "entropy_coef": 0.01, "progress": False, "plot": False})
    trainer.run()
    assert trainer.evaluate(64, greedy=True) > trainer.env.solved_return


# ---------------------------------------------------------------- decentralized
DECENTRALIZED = {**TINY_PPO, "agents": 2, "average_every": 2, "timeout": 240.0}


@pytest.mark.parametrize("mode", ["allreduce", "ring"])
def test_decentralized_agents_end_each_round_identical(mode, tmp_path):
    out = str(tmp_path / mode)
    # epochs * minibatches = 4 optimiser steps per training step: every step ends on a round
    metrics = trainers.train("decentralized", {**DECENTRALIZED, "mode": mode, "steps": 3}, out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["param_spread_after"] == 0.0 for m in metrics)
    assert all(m["param_spread"] > 0.0 for m in metrics)  # the local steps took the agents apart
    assert [m["rounds"] for m in metrics] == [2, 4, 6]
    rewards = [m["agent_rewards"] for m in metrics]
    assert all(len(r) == 2 for r in rewards) and any(r[0] != r[1] for r in rewards)  # own env seeds
    agent0 = load_module_state(os.path.join(out, "agent0", "checkpoint", "actor_critic.safetensors"))
    agent1 = load_module_state(os.path.join(out, "agent1", "checkpoint", "actor_critic.safetensors"))
    assert all(torch.equal(agent0[k], agent1[k]) for k in agent0)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        combined = [json.loads(line) for line in fh]
    assert [c["step"] for c in combined] == [1, 2, 3]
    assert all(c["reward"] == pytest.approx(sum(c["agent_rewards"]) / 2) for c in combined)


def test_decentralized_gossip_and_resume(tmp_path):
    out = str(tmp_path / "gossip")
    config = {**DECENTRALIZED, "mode": "gossip", "alpha": 0.5, "steps": 2}
    first = trainers.train("decentralized", config, out)
    for m in first:
        # measured before the step's last round, and after it: gossip mixes towards the mean without reaching it
        assert m["param_spread"] > 0 and 0 < m["param_spread_after"] <= m["param_spread"]
    resumed = trainers.train("decentralized", {**config, "steps": 3}, out, resume=True)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2, 3]


def test_decentralized_default_run_is_several_gossiping_agents(tmp_path):
    """The default run (one step of it here) is what decentralization means: more than
    two agents, gossip with ring neighbours only, agents that disagree before a round,
    and a plot of each agent's reward and of the spread."""
    out = str(tmp_path / "default")
    config = trainers.make_config("decentralized", {"steps": 1, "progress": False, "timeout": 240.0})
    assert config.mode == "gossip" and config.agents > 2
    trainers.train("decentralized", config, out)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        combined = [json.loads(line) for line in fh]
    assert len(combined) == 1 and len(combined[0]["agent_rewards"]) == config.agents
    assert combined[0]["param_spread"] > combined[0]["param_spread_after"] > 0
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000


def test_decentralized_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        trainers.trainer_class("decentralized")(DECENTRALIZED)
