"""Decentralized multi-agent PPO: N agents, each a process with its own environment
seed, run local classic-PPO steps and exchange what they learned through
`rlkernels.distributed.DecentralizedAverager`.  Every `average_every` local optimiser
steps a round moves each agent to theta_i = theta_global + alpha * delta_theta_i:
in allreduce or ring mode theta_global is where the round's local steps started and
delta_theta_i the mean of all agents' updates since (so every agent ends the round
on the same, new theta_global); in gossip mode (the default) theta_global is the
agent's own parameters and delta_theta_i = mix_i - theta_i, the pull towards the
weighted mean of itself and its two ring neighbours, so agents only ever talk to
neighbours and stay apart.

Launch: `rlkernels train decentralized` starts `agents` local processes over gloo; under
`torchrun` (RANK / WORLD_SIZE set) each torchrun process is one agent, so the same
command runs across machines (NCCL on GPUs via dist_backend="nccl").

Output: `<out>/agent<i>/` holds each agent's metrics, plot and checkpoint; agent 0 also
writes `<out>/metrics.jsonl` and `<out>/curves.png` with each agent's reward, the mean,
and `param_spread`: the largest parameter difference between agents just before the
step's last averaging round, i.e. how far the local steps took the agents apart, the
disagreement the round acts on.  `param_spread_after` is the same at the end of the
step (0 in allreduce/ring mode when the step ends on a round; smaller but not 0 with
gossip)."""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import METRICS_FILE, PLOT_FILE, read_metrics, reset_out
from .config import ConfigError
from .ppo import PPOConfig, PPOTrainer

MODES = ("allreduce", "ring", "gossip")


@dataclass
class DecentralizedConfig(PPOConfig):
    steps: int = 12                  # a short default run (several agents share the machine's cores)
    num_envs: int = 8
    rollout_steps: int = 128
    agents: int = 4                  # processes started locally (ignored under torchrun)
    mode: str = "gossip"             # "gossip" (ring neighbours only), "allreduce" or "ring"
    average_every: int = 4           # local optimiser steps per averaging round
    alpha: float = 1.0               # theta_i = theta_global + alpha * delta_theta_i (module docstring)
    average_optimizer_state: bool = False
    dist_backend: str = "gloo"
    timeout: float = 900.0           # seconds: the whole local run, and each collective

    def check(self) -> None:
        super().check()
        self._positive("agents", "average_every", "alpha", "timeout")
        self._at_most("agents", MAX_LOCAL_AGENTS)
        if self.timeout < MIN_TIMEOUT:
            raise ConfigError("timeout", f"must be at least {MIN_TIMEOUT:g} seconds (starting the agent processes "
                                         f"alone takes seconds), got {self.timeout!r}")
        self._one_of("mode", MODES)
        self._one_of("dist_backend", ("gloo", "nccl"))
        if self.mode == "gossip" and self.alpha > 1:
            raise ConfigError("alpha", f"gossip mode needs 0 < alpha <= 1, got {self.alpha}")
        if self.env.startswith("gym:"):
            raise ConfigError("env", "the decentralized trainer checkpoints its environments: use cartpole or gridworld")


# The shortest run timeout accepted: below it a run could only end killed.
MIN_TIMEOUT = 10.0
# The most agent processes one command starts on this machine (a typo must not start
# thousands); larger runs launch one agent a process under torchrun.
MAX_LOCAL_AGENTS = 256


class DecentralizedPPOTrainer(PPOTrainer):
    """One agent.  The process group must be initialised before construction."""

    name = "decentralized"
    config_class = DecentralizedConfig
    plot_keys = ("reward", "loss", "kl", ("param_spread", "param_spread_after"))
    # the combined plot of all agents
    combined_plot_keys = ("agent_rewards", ("param_spread", "param_spread_after"), "loss", "kl")

    def __init__(self, config, out: str | None = None, *, kernels: str | None = None, combined_out: str | None = None):
        if not dist.is_initialized():
            raise RuntimeError("DecentralizedPPOTrainer needs an initialised torch.distributed process group "
                               "(use train_decentralized, or launch with torchrun)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.combined_out = combined_out
        super().__init__(config, out, kernels=kernels)

    def env_seed(self) -> int:
        return self.config.seed + 1009 * self.rank

    def setup(self) -> None:
        from ..distributed import DecentralizedAverager

        cfg: DecentralizedConfig = self.config
        super().setup()  # every agent builds the same initial networks (same seed) ...
        self.averager = DecentralizedAverager(
            self.net, mode=cfg.mode, every=cfg.average_every, alpha=cfg.alpha, optimizer=self.optimizer,
            average_optimizer_state=cfg.average_optimizer_state,
            backend="reference" if self.ops.name == "reference" else "auto")
        # ... and then samples its own actions and minibatches
        agent_seed = cfg.seed + 7919 * self.rank
        torch.manual_seed(agent_seed)
        self.generator.manual_seed(agent_seed)
        self.rng.seed(agent_seed)

    def after_optimizer_step(self) -> None:
        if (self.averager.steps + 1) % self.averager.every == 0:  # a round follows: measure what it acts on
            self.spread_before = self._spread()
        self.averager.step()

    def extra_state(self):
        tensors, values = super().extra_state()
        state = self.averager.state_dict()
        for i, flat in enumerate(state["theta_global"]):
            tensors[f"averager/theta_global/{i}"] = flat
        values["averager"] = {"steps": state["steps"], "rounds": state["rounds"], "buckets": len(state["theta_global"])}
        return tensors, values

    @staticmethod
    def _averager_state(tensors, values) -> dict:
        meta = values["averager"]
        return {"steps": meta["steps"], "rounds": meta["rounds"],
                "theta_global": [tensors[f"averager/theta_global/{i}"] for i in range(meta["buckets"])]}

    def check_extra_state(self, tensors, values, tensor_file, json_file):
        from .checkpoint import CheckpointError

        super().check_extra_state(tensors, values, tensor_file, json_file)
        try:
            self.averager.check_state_dict(self._averager_state(tensors, values))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(json_file, f"the averager state does not fit ({exc})") from None

    def load_extra_state(self, tensors, values):
        super().load_extra_state(tensors, values)
        self.averager.load_state_dict(self._averager_state(tensors, values))

    @torch.no_grad()
    def _spread(self) -> float:
        flat = torch.cat([p.detach().reshape(-1).float() for p in self.net.parameters()])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return float((high - low).max())

    def train_step(self) -> dict:
        self.spread_before = None
        metrics = super().train_step()
        spread_after = self._spread()
        keys = ("reward", "loss", "kl", "entropy")
        local = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        table = torch.stack(gathered)
        # a step without a round: the spread now is what the next round will act on
        spread = spread_after if self.spread_before is None else self.spread_before
        metrics.update(agent_rewards=table[:, 0].tolist(), param_spread=spread, param_spread_after=spread_after,
                       rounds=self.averager.rounds)
        if self.combined_out:
            combined = {"step": self.step + 1, **{k: float(table[:, i].mean()) for i, k in enumerate(keys)},
                        "agent_rewards": table[:, 0].tolist(), "param_spread": spread,
                        "param_spread_after": spread_after, "rounds": self.averager.rounds}
            with open(os.path.join(self.combined_out, METRICS_FILE), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(combined) + "\n")
        return metrics

    def run(self, steps=None, *, resume=False, callback=None):
        if self.combined_out and not resume and self.step == 0:
            reset_out(self.combined_out)
            os.makedirs(self.combined_out, exist_ok=True)
        out = super().run(steps, resume=resume, callback=callback)
        if self.combined_out and self.config.plot:
            from .plot import save_curves

            save_curves(read_metrics(os.path.join(self.combined_out, METRICS_FILE)),
                        os.path.join(self.combined_out, PLOT_FILE), keys=self.combined_plot_keys,
                        title=f"{self.name}: {self.world_size} agents, {self.config.mode} every "
                              f"{self.config.average_every} optimiser steps, alpha {self.config.alpha:g} "
                              "(loss, kl: mean over agents)")
        return out

    def load_checkpoint(self, path=None):
        """Every agent reads and checks its checkpoint (agent 0 also the combined metrics
        log), then they agree: all load, or (CheckpointError on every agent) none does,
        so no agent trains on alone and no file changes."""
        from .checkpoint import CheckpointError

        try:
            loaded, error = self.read_checkpoint(path), None
            combined = None
            if self.combined_out:
                combined_path = os.path.join(self.combined_out, METRICS_FILE)
                combined = (combined_path, [m for m in read_metrics(combined_path) if m["step"] <= loaded.step])
        except CheckpointError as exc:
            loaded, error = None, exc
        flags = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(flags, torch.tensor([0 if error is None else 1], dtype=torch.int64))
        if error is not None:
            raise error
        bad = [rank for rank, flag in enumerate(flags) if int(flag)]
        if bad:
            error = CheckpointError(path or self.checkpoint_dir, f"not loaded: the checkpoint of agent(s) "
                                    f"{', '.join(map(str, bad))} is unusable (their error names the file)")
            error.secondary = True
            raise error
        self.apply_checkpoint(loaded)
        if combined is not None:
            with open(combined[0], "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(m) + "\n" for m in combined[1])


def agent_dir(out: str | None, rank: int) -> str | None:
    return os.path.join(out, f"agent{rank}") if out else None


def _agent(rank: int, world_size: int, config: dict, out: str | None, resume: bool, steps: int | None) -> dict:
    """One agent process (module level so the launcher can import it)."""
    from .checkpoint import CheckpointError

    cfg = DecentralizedConfig.from_dict(config)
    if rank != 0:
        cfg = cfg.replace(progress=False)
    trainer = DecentralizedPPOTrainer(cfg, agent_dir(out, rank), combined_out=out if rank == 0 else None)
    try:
        trainer.run(steps, resume=resume)
    except CheckpointError as exc:  # raised on every agent before any of them changed anything
        return {"checkpoint_error": exc.message, "path": exc.path, "own": not getattr(exc, "secondary", False)}
    return {"metrics": trainer.metrics, "summary": trainer.summary()}


def _check_agent_count(agents: int, out: str) -> None:
    """CheckpointError unless the run in `out` holds checkpoints of exactly `agents`
    agents (agent0 .. agent{agents-1}): resuming with fewer had silently dropped agents,
    with more had said there was no checkpoint and to start again."""
    from .checkpoint import STATE_JSON, CheckpointError

    saved = 0
    while os.path.isfile(os.path.join(out, f"agent{saved}", "checkpoint", STATE_JSON)):
        saved += 1
    if saved and saved != agents:
        raise CheckpointError(os.path.join(out, f"agent{min(saved, agents)}", "checkpoint"),
                              f"the run holds the checkpoints of {saved} agents, and this resume asks for {agents}: "
                              f"resume with agents={saved}")


def train_decentralized(config: DecentralizedConfig, out: str | None = None, *, resume: bool = False,
                        steps: int | None = None) -> list[dict]:
    """Runs the agents and returns agent 0's metrics.  Under torchrun (RANK and
    WORLD_SIZE in the environment) this process is one agent; otherwise `agents`
    local processes are started over gloo."""
    if resume and not out:
        raise ValueError("decentralized: resume needs an output directory")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        created = not dist.is_initialized()
        if created:
            dist.init_process_group(config.dist_backend,
                                    timeout=datetime.timedelta(seconds=config.timeout))
        try:
            return _agent(dist.get_rank(), dist.get_world_size(), config.to_dict(), out, resume, steps)["metrics"]
        finally:
            if created:  # ours to close (a caller's process group stays as it was)
                dist.destroy_process_group()
    if resume:
        _check_agent_count(config.agents, out)
    from ..distributed._launch import run_ranks

    results = run_ranks(_agent, config.agents, args=(config.to_dict(), out, resume, steps),
                        timeout_s=config.timeout, pg_timeout_s=min(config.timeout, 300.0),
                        backend=config.dist_backend, threads=max(1, config.threads))
    failed = [r for r in results if not r.ok]
    if failed:
        report = "\n".join(f"--- agent {r.rank} ---\n{r.error}" for r in failed)
        raise RuntimeError(f"decentralized: {len(failed)} of {config.agents} agents failed\n{report}")
    refused = [r.value for r in results if "checkpoint_error" in r.value]
    if refused:
        from .checkpoint import CheckpointError

        first = next((v for v in refused if v["own"]), refused[0])
        raise CheckpointError(first["path"], first["checkpoint_error"])
    return results[0].value["metrics"]
