"""Damaged checkpoints: every file a trainer writes (each module's safetensors, the
optimiser/RNG/extra tensors, trainer_state.json and the metrics log) is damaged in
every way in the tables of tests/checkpoint_damage.py, and loading it must raise one
CheckpointError naming the file with the trainer exactly as it was (parameters,
optimiser state, step, RNG streams, extra state) and the run folder untouched.  The command line (`rlkernels
train --resume`) must answer the same damage with exit code 2 and one line on stderr.

The trainers are tiny and built once per module; each case copies a saved run folder
and damages the copy."""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from rlkernels import trainers
from rlkernels.cli import main
from rlkernels.trainers.checkpoint import STATE_JSON, STATE_TENSORS, CheckpointError
from checkpoint_damage import NOT_DAMAGE, TENSOR_EDITS, cases, damaged_copy, edit_tensors, target_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {"n_layer": 1, "n_embd": 16, "n_head": 2, "pretrain_steps": 2}
TINY_PPO = {"num_envs": 4, "rollout_steps": 8, "epochs": 1, "minibatches": 2, "progress": False, "plot": False}
CONFIGS = {
    "ppo": {**TINY_PPO, "steps": 2},
    "ppo-rlhf": {"batch_size": 4, "minibatch_size": 2, "max_new_tokens": 3, "model": TINY_MODEL, "steps": 1,
                 "progress": False, "plot": False},
    "decentralized": {**TINY_PPO, "steps": 2, "average_every": 1, "agents": 1},
}


# ---------------------------------------------------------------- saved runs and snapshots
class Run:
    """A trainer that saved a checkpoint into `folder`; cases damage copies of it."""

    def __init__(self, name, trainer, folder):
        self.name, self.trainer, self.folder = name, trainer, folder

    def files(self) -> list[str]:
        """Every file the trainer wrote that a resume reads, relative to the run folder."""
        ckpt = sorted(os.path.join("checkpoint", f) for f in os.listdir(os.path.join(self.folder, "checkpoint")))
        return ckpt + ["metrics.jsonl"]


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-rank gloo group, for the decentralized trainer's averager."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request, tmp_path_factory):
    name = request.param
    if name == "decentralized":
        request.getfixturevalue("process_group")
    folder = str(tmp_path_factory.mktemp(name.replace("-", "_")) / "run")
    config = trainers.make_config(name, CONFIGS[name])
    trainer = trainers.trainer_class(name)(config, folder)
    trainer.run()
    return Run(name, trainer, folder)


def folder_state(folder: str) -> dict:
    """What is in a folder, without opening anything that is not a regular file."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for entry in dirs + files:
            path = os.path.join(base, entry)
            info = os.lstat(path)
            rel = os.path.relpath(path, folder)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):  # the sparse 'oversize' files: their size and head
                with open(path, "rb") as fh:
                    out[rel] = ("file", info.st_size, hashlib.sha256(fh.read(1 << 24)).hexdigest())
            else:
                out[rel] = ("other", stat.S_IFMT(info.st_mode), info.st_size)
    return out


def trainer_state(trainer) -> dict:
    tensors, values = trainer.extra_state()
    return {
        "step": trainer.step,
        "metrics": copy.deepcopy(trainer.metrics),
        "modules": {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in trainer.modules().items()},
        "optimizers": {n: copy.deepcopy(o.state_dict()) for n, o in trainer.optimizers().items()},
        "torch_rng": torch.get_rng_state(),
        "generator": trainer.generator.get_state(),
        "python_rng": trainer.rng.getstate(),
        "extra": ({k: v.clone() for k, v in tensors.items()}, copy.deepcopy(values)),
    }


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ---------------------------------------------------------------- the tables
@pytest.mark.parametrize("kind,how", cases(), ids=[f"{k}-{h}" for k, h in cases()])
def test_damaged_checkpoint_is_refused_whole(run, kind, how, tmp_path):
    """Library level: trainer.load_checkpoint raises CheckpointError naming the damaged
    file; the trainer and the run folder are exactly as before."""
    for rel in target_files(run, kind):
        if (rel, how.partition(":")[2]) in NOT_DAMAGE:
            continue
        folder = damaged_copy(run, rel, how, tmp_path / rel.replace(os.sep, "_"))
        before_files = folder_state(folder)
        before = trainer_state(run.trainer)
        saved_out = run.trainer.out
        run.trainer.out = folder
        try:
            with pytest.raises(CheckpointError) as info:
                run.trainer.load_checkpoint()
        finally:
            run.trainer.out = saved_out
        message = str(info.value)
        assert "\n" not in message
        assert os.path.join(folder, rel) in message or info.value.path == os.path.join(folder, rel), message
        assert_same(before, trainer_state(run.trainer))
        assert folder_state(folder) == before_files


def test_undamaged_copy_loads(run, tmp_path):
    """The control: the same copy without damage loads (so the table tests the damage)."""
    folder = str(tmp_path / "run")
    shutil.copytree(run.folder, folder)
    saved_out, run.trainer.out = run.trainer.out, folder
    try:
        run.trainer.load_checkpoint()
    finally:
        run.trainer.out = saved_out
    assert run.trainer.step == CONFIGS[run.name]["steps"]


# ---------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli") / "run")
    argv = ["train", "ppo", "--steps", "2", "--out", folder, "--no-progress", "--set", "plot=false"]
    for key, value in TINY_PPO.items():
        if key not in ("progress", "plot"):
            argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    return Run("ppo", None, folder)


CLI_CASES = [(kind, how) for kind, how in cases() if not how.startswith("tensor:") or "@optim/" in how
             or kind == "module"]


@pytest.mark.parametrize("kind,how", CLI_CASES, ids=[f"{k}-{h}" for k, h in CLI_CASES])
def test_resume_from_damaged_checkpoint_exits_2(ppo_run, kind, how, tmp_path, capsys):
    for rel in target_files(ppo_run, kind):
        if (rel, how.partition(":")[2]) in NOT_DAMAGE:
            continue
        folder = damaged_copy(ppo_run, rel, how, tmp_path / rel.replace(os.sep, "_"))
        before = folder_state(folder)
        capsys.readouterr()
        code = main(["train", "ppo", "--resume", "--steps", "3", "--out", folder, "--no-progress"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, captured.err
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        # the run folder's own files (metrics log) may be refused by the --out check that comes first
        assert lines[0].startswith(("rlkernels train ppo: --resume: ", "rlkernels train ppo: --out: ")), lines[0]
        assert os.path.join(folder, rel) in lines[0], lines[0]
        assert captured.out == ""
        assert folder_state(folder) == before


@pytest.mark.parametrize("how", ["any:fifo", "any:link_dev_zero"])
def test_resume_never_waits_on_a_fifo_or_reads_a_device(ppo_run, how, tmp_path):
    """In a fresh process, with a deadline: a FIFO named trainer_state.json (which a
    plain open() would wait on forever) and a link to /dev/zero (which a plain read
    would read until memory runs out) are refused at once."""
    rel = os.path.join("checkpoint", STATE_JSON if how == "any:fifo" else "actor_critic.safetensors")
    folder = damaged_copy(ppo_run, rel, how, tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "rlkernels", "train", "ppo", "--resume", "--steps", "3",
                           "--out", folder, "--no-progress"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and os.path.join(folder, rel) in lines[0], proc.stderr[-3000:]
    assert ("is a FIFO" if how == "any:fifo" else "/dev/zero, outside the checkpoint directory") in lines[0]


def test_resume_of_two_agents_with_one_damaged_checkpoint(tmp_path, capsys):
    """Decentralized, 2 agent processes: agent 1's checkpoint is damaged, so both
    refuse to load (neither trains on alone, nothing waits for the other) and the CLI
    names agent 1's file."""
    out = str(tmp_path / "run")
    argv = ["train", "decentralized", "--steps", "1", "--out", out, "--no-progress", "--set", "plot=false",
            "--set", "average_every=1", "--set", "timeout=120"]
    for key, value in TINY_PPO.items():
        if key not in ("progress", "plot"):
            argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    damaged = os.path.join(out, "agent1", "checkpoint", STATE_TENSORS)
    edit_tensors(damaged, lambda t: TENSOR_EDITS["wrong_shape"](t, "optim/"))
    before = folder_state(out)
    capsys.readouterr()
    assert main(["train", "decentralized", "--resume", "--steps", "2", "--out", out, "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and damaged in lines[0], lines
    assert folder_state(out) == before


def _refused(run, tmp_path, edit, file_name, match):
    """A copy of the run's checkpoint with `edit(folder)` applied: load_checkpoint raises
    CheckpointError naming `file_name` and matching `match`, and changes nothing."""
    folder = str(tmp_path / "copy")
    shutil.copytree(run.folder, folder)
    edit(os.path.join(folder, "checkpoint"))
    before = trainer_state(run.trainer)
    saved_out = run.trainer.out
    run.trainer.out = folder
    try:
        with pytest.raises(CheckpointError, match=match) as info:
            run.trainer.load_checkpoint()
    finally:
        run.trainer.out = saved_out
    assert file_name in str(info.value)
    assert_same(before, trainer_state(run.trainer))


def _first_optim_key(tensors, suffix):
    keys = sorted(k for k in tensors if k.startswith("optim/") and k.endswith(suffix))
    if not keys:
        pytest.skip(f"no optimiser tensor */{suffix} in this checkpoint")
    return keys[0]


def test_negative_second_moment_is_refused(run, tmp_path):
    """Adam's exp_avg_sq is >= 0: a negative one made the next step NaN, silently."""
    def edit(folder):
        def negate(tensors):
            key = _first_optim_key(tensors, "/exp_avg_sq")
            tensors[key] = -tensors[key].abs() - 1.0
        edit_tensors(os.path.join(folder, STATE_TENSORS), negate)
    _refused(run, tmp_path, edit, STATE_TENSORS, "negative values")


def test_an_adam_entry_missing_from_a_parameter_is_refused(run, tmp_path):
    """A parameter's state without exp_avg_sq (JSON entry and tensor both gone) had ended
    in a KeyError inside Adam's step."""
    def edit(folder):
        removed = []

        def drop(tensors):
            key = _first_optim_key(tensors, "/exp_avg_sq")
            removed.append(key)
            del tensors[key]
        edit_tensors(os.path.join(folder, STATE_TENSORS), drop)
        _, name, pid, _ = removed[0].split("/")
        path = os.path.join(folder, STATE_JSON)
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
        del meta["optimizers"][name]["state"][pid]["exp_avg_sq"]
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
    _refused(run, tmp_path, edit, STATE_JSON, "lacks 'exp_avg_sq'")


@pytest.mark.parametrize("damage", ["generator", "episode_length"])
def test_bad_environment_state_is_refused_before_anything_loads(run, tmp_path, damage):
    """The environment's RNG state and episode lengths are checked with the rest: a bad
    one had been found only after the modules and optimisers were loaded (a half-loaded
    trainer), or (a negative length) not at all."""
    if run.name not in ("ppo", "decentralized"):
        pytest.skip("no environment state")

    def edit(folder):
        def spoil(tensors):
            key = next((k for k in tensors if k.endswith(f"env/{damage}")), None)
            if key is None:
                pytest.skip(f"no extra/env/{damage}")
            tensors[key] = torch.full_like(tensors[key], 255 if damage == "generator" else -1000000)
        edit_tensors(os.path.join(folder, STATE_TENSORS), spoil)
    _refused(run, tmp_path, edit, STATE_TENSORS, "generator state" if damage == "generator" else "episode_length")


@pytest.mark.parametrize("stray", ["checkpoint.tmp", "checkpoint.old"])
def test_a_stray_file_on_a_save_scratch_name_does_not_break_the_save(run, tmp_path, stray):
    """A file (not a folder) named checkpoint.tmp or checkpoint.old in the run folder had
    made the save at the end of a run fail (FileExistsError / NotADirectoryError)."""
    folder = str(tmp_path / "copy")
    shutil.copytree(run.folder, folder)
    with open(os.path.join(folder, stray), "w") as fh:
        fh.write("x")
    path = run.trainer.save_checkpoint(os.path.join(folder, "checkpoint"))
    assert os.path.isfile(os.path.join(path, STATE_JSON))
    assert not os.path.lexists(os.path.join(folder, "checkpoint.tmp"))
    assert not os.path.lexists(os.path.join(folder, "checkpoint.old"))


def test_resume_after_an_interrupted_save_points_at_the_previous_checkpoint(ppo_run, tmp_path, capsys):
    """A save stopped between its two renames leaves only checkpoint.old (whole) and
    checkpoint.tmp: resume says so and names checkpoint.old, rather than saying there is
    no checkpoint and to start again."""
    folder = str(tmp_path / "run")
    shutil.copytree(ppo_run.folder, folder)
    os.replace(os.path.join(folder, "checkpoint"), os.path.join(folder, "checkpoint.old"))
    capsys.readouterr()
    assert main(["train", "ppo", "--resume", "--steps", "3", "--out", folder, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.old holds the previous one" in err and "run without --resume" not in err, err


def test_a_metrics_value_that_is_not_a_number_is_refused_on_resume(ppo_run, tmp_path, capsys):
    """The final summary adds up 'reward': a string there had crashed the CLI after the
    run and its save; it is now refused with the other checks, before anything runs."""
    folder = str(tmp_path / "run")
    shutil.copytree(ppo_run.folder, folder)
    metrics = os.path.join(folder, "metrics.jsonl")
    with open(metrics, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    records[0]["reward"] = "abc"
    with open(metrics, "w", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))
    before = folder_state(folder)
    capsys.readouterr()
    assert main(["train", "ppo", "--resume", "--steps", "3", "--out", folder, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'reward'" in err[0] and "metrics.jsonl" in err[0], err
    assert folder_state(folder) == before


def test_resume_of_two_agents_with_another_agent_count_is_refused(tmp_path, capsys):
    """A 2-agent run resumed with agents=1 had silently dropped agent 1; with agents=3 it
    had said there was no checkpoint and to start again.  Both now name the saved count,
    exit 2, and change nothing."""
    out = str(tmp_path / "run")
    argv = ["train", "decentralized", "--steps", "1", "--out", out, "--no-progress", "--set", "plot=false",
            "--set", "average_every=1", "--set", "timeout=120", "--set", "agents=2"]
    for key, value in TINY_PPO.items():
        if key not in ("progress", "plot"):
            argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    before = folder_state(out)
    for agents in (1, 3):
        capsys.readouterr()
        assert main(["train", "decentralized", "--resume", "--steps", "2", "--out", out, "--no-progress",
                     "--set", f"agents={agents}"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "checkpoints of 2 agents" in lines[0] and "agents=2" in lines[0], lines
        assert folder_state(out) == before
