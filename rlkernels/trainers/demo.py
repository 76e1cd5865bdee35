"""`rlkernels demo`: a short PPO-RLHF run on the embedded default (a tiny GPT-2 built in
code learns to write positive reviews from a rule-based reward), printing the reward
curve, a few responses before and after, and writing the PNG of the curves."""
from __future__ import annotations

import os
import random
import time

import torch

DEMO_CONFIG = {
    "steps": 60,
    "batch_size": 32,
    "minibatch_size": 16,
    "ppo_epochs": 2,
    "max_new_tokens": 12,
    "lr": 1e-3,
    "kl_coef": 0.05,
    "model": {"n_layer": 2, "n_embd": 64, "n_head": 4, "pretrain_steps": 150},
}
_BARS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    points = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    return "".join(_BARS[1 + int((p - low) / span * (len(_BARS) - 2))] for p in points)


@torch.no_grad()
def _samples(trainer, prompts: list[str], seed: int) -> list[str]:
    from .lm import sample

    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        torch.manual_seed(seed)
        rollout = sample(trainer.policy, trainer.tokenizer, prompts, max_new_tokens=trainer.config.max_new_tokens,
                         device=trainer.device)
    return rollout.responses


def demo(out: str | None = os.path.join("runs", "demo"), *, steps: int | None = None, kernels: str = "rlkernels",
         progress: bool = True, echo=print) -> dict:
    """Runs the demo and returns {reward_first, reward_last, seconds, png}."""
    from . import toy
    from .ppo_rlhf import PPORLHFTrainer

    config = dict(DEMO_CONFIG, kernels=kernels, progress=progress)
    if steps is not None:
        config["steps"] = steps
    start = time.perf_counter()
    echo(f"rlkernels demo: PPO-RLHF on the embedded default ({config['steps']} steps, kernels={kernels})")
    echo("  policy: a 2-layer GPT-2 built in code, warmed up on reviews of random sentiment; reward: +1/2 per "
         "positive word, -1/2 per negative one, clipped to [-1, 1]; KL penalty to the frozen warm-up model")
    trainer = PPORLHFTrainer(config, out)
    prompts = toy.sample_prompts(3, random.Random(2024))
    before = _samples(trainer, prompts, seed=1)
    metrics = trainer.run()
    after = _samples(trainer, prompts, seed=1)
    rewards = [m["reward"] for m in metrics]
    k = max(1, min(10, len(rewards) // 5))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    seconds = time.perf_counter() - start
    echo("")
    echo(f"reward per step  {sparkline(rewards)}")
    marks = sorted({0, len(metrics) // 4, len(metrics) // 2, 3 * len(metrics) // 4, len(metrics) - 1})
    echo("  " + "  ".join(f"step {metrics[i]['step']}: {metrics[i]['reward']:+.3f}" for i in marks))
    echo(f"mean reward of the first {k} steps {first:+.3f} -> last {k} steps {last:+.3f}  "
         f"(KL to reference {metrics[-1].get('kl', float('nan')):.3f} nats/response)")
    echo("")
    for prompt, b, a in zip(prompts, before, after):
        echo(f"  {prompt}")
        echo(f"     before: {b}    [{toy.sentiment_score(prompt, b):+.1f}]")
        echo(f"     after:  {a}    [{toy.sentiment_score(prompt, a):+.1f}]")
    png = os.path.join(out, "curves.png") if out else None
    echo("")
    echo(f"{len(metrics)} steps in {seconds:.0f} s; curves: {png}" if png else f"{len(metrics)} steps in {seconds:.0f} s")
    return {"reward_first": first, "reward_last": last, "seconds": seconds, "png": png}
