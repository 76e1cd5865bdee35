"""Damaged checkpoints: every file a trainer writes (each module's safetensors, the
optimiser/RNG/extra tensors, trainer_state.json and the metrics log) is damaged in
every way in the tables below, and loading it must raise one CheckpointError naming
the file with the trainer exactly as it was (parameters, optimiser state, step, RNG
streams, extra state) and the run folder untouched.  The command line (`rlkernels
train --resume`) must answer the same damage with exit code 2 and one line on stderr.

The trainers are tiny and built once per module; each case copies a saved run folder
and damages the copy."""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import pickle
import random
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rlkernels import trainers
from rlkernels.cli import main
from rlkernels.trainers.checkpoint import STATE_JSON, STATE_TENSORS, CheckpointError

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


# ---------------------------------------------------------------- the damage
def _write(path, data: bytes):
    with open(path, "wb") as fh:
        fh.write(data)


def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _link_outside(path):
    outside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), "outside-" + os.path.basename(path))
    shutil.copyfile(path, outside)  # a perfectly good file, but not in the checkpoint folder
    os.remove(path)
    os.symlink(outside, path)


def _replace(path, make):
    os.remove(path)
    make(path)


# Damage that applies to any file: (name, function of the file's path).
ANY_FILE = {
    "pickle": lambda p: _write(p, pickle.dumps({"weight": [1.0, 2.0]})),
    "truncated_half": lambda p: _write(p, _read(p)[:_mid_line_cut(_read(p))]),
    "truncated_end": lambda p: _write(p, _read(p)[:-3]),
    "empty": lambda p: _write(p, b""),
    "header_length_2_40": lambda p: _write(p, (2 ** 40).to_bytes(8, "little") + _read(p)[8:]),
    "random_bytes": lambda p: _write(p, bytes(random.Random(0).randrange(256) for _ in range(4096))),
    "link_outside": _link_outside,
    "link_dev_zero": lambda p: _replace(p, lambda q: os.symlink("/dev/zero", q)),
    "link_dangling": lambda p: _replace(p, lambda q: os.symlink(q + ".nowhere", q)),
    "fifo": lambda p: _replace(p, os.mkfifo),
    "directory": lambda p: _replace(p, os.mkdir),
    "missing": os.remove,
    "oversize": lambda p: os.truncate(p, os.path.getsize(p) + (3 << 30)),  # sparse: nothing is written
}
# A missing or empty metrics log only means no steps were logged: not damage.
def _mid_line_cut(data: bytes) -> int:
    """About half of the file, ending inside a line: a cut just after a newline would
    leave a shorter but well-formed line-based file (metrics.jsonl), whose lengths vary
    with the logged step times."""
    cut = len(data) // 2 + 1
    while cut < len(data) and data[cut - 1:cut] == b"\n":
        cut += 1
    return cut


NOT_DAMAGE = {("metrics.jsonl", "missing"), ("metrics.jsonl", "empty")}


def _edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first(tensors, prefix, floating=True):
    keys = sorted(k for k, v in tensors.items() if k.startswith(prefix) and (v.is_floating_point() or not floating))
    if not keys:
        pytest.skip(f"no tensor {prefix}* in this checkpoint")
    return keys[0]


def _reshape(tensors, prefix):
    key = _first(tensors, prefix, floating=False)
    value = tensors[key]
    tensors[key] = torch.zeros((value.shape[0] + 1,) + tuple(value.shape[1:]) if value.dim() else (2,),
                               dtype=value.dtype)


def _redtype(tensors, prefix):
    key = _first(tensors, prefix, floating=False)
    tensors[key] = tensors[key].to(torch.float64 if tensors[key].dtype != torch.float64 else torch.float32)


def _zero_dim(tensors, prefix):
    key = _first(tensors, prefix, floating=False)
    tensors[key] = torch.tensor(1, dtype=tensors[key].dtype)


def _nan(tensors, prefix):
    key = _first(tensors, prefix)
    value = tensors[key].clone()
    value.view(-1)[0] = float("nan")
    tensors[key] = value


def _drop(tensors, prefix):
    del tensors[_first(tensors, prefix, floating=False)]


TENSOR_EDITS = {"wrong_shape": _reshape, "wrong_dtype": _redtype, "zero_dim": _zero_dim, "nan": _nan,
                "missing_key": _drop}
# Which tensors of trainer_state.safetensors to damage (module files: every edit on their first tensor).
STATE_PREFIXES = ["optim/", "rng/torch", "rng/generator", "extra/"]


def _edit_json(path, edit):
    with open(path) as fh:
        meta = json.load(fh)
    result = edit(meta)
    with open(path, "w") as fh:
        json.dump(meta if result is None else result, fh)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _group(key, value):
    return lambda meta: meta["optimizers"]["optimizer"]["param_groups"][0].__setitem__(key, value)


def _python_rng_index(value):
    def edit(meta):
        meta["python_rng"][1][-1] = value
    return edit


def _optimizer_entry(edit_entry):
    def edit(meta):
        state = meta["optimizers"]["optimizer"]["state"]
        edit_entry(state, next(iter(state)))
    return edit


JSON_EDITS = {
    "step_abc": _set("step", "abc"),
    "step_negative": _set("step", -5),
    "step_fraction": _set("step", 2.5),
    "step_null": _set("step", None),
    "step_bool": _set("step", True),
    "step_huge": _set("step", 10 ** 30),
    "trainer_mismatch": _set("trainer", "grpo"),
    "format_unknown": _set("format", 99),
    "modules_wrong": _set("modules", ["brain"]),
    "optimizers_missing": _set("optimizers", {}),
    "config_not_object": _set("config", [1, 2]),
    "extra_not_object": _set("extra", "none"),
    "lr_string": _group("lr", "fast"),
    "lr_nan": _group("lr", float("nan")),
    "betas_short": _group("betas", [0.9]),
    "group_params_wrong": _group("params", [999]),
    "group_key_missing": lambda meta: meta["optimizers"]["optimizer"]["param_groups"][0].pop("eps"),
    "optimizer_state_for_no_param": _optimizer_entry(lambda state, pid: state.__setitem__("999", state[pid])),
    "optimizer_state_spec_bad": _optimizer_entry(lambda state, pid: state[pid].__setitem__("exp_avg", {"tensor": 1})),
    "python_rng_short": _set("python_rng", [3, [1, 2, 3], None]),
    "python_rng_index": _python_rng_index(10 ** 6),
    "python_rng_negative": _python_rng_index(-1),
    "python_rng_gauss": lambda meta: meta["python_rng"].__setitem__(2, "x"),
    "python_rng_not_list": _set("python_rng", {"a": 1}),
    "top_level_list": lambda meta: [meta],
    "nan_constant": None,  # raw bytes below
    "utf16": None,
}


def _damage_json_raw(path, kind):
    text = _read(path).decode()
    if kind == "nan_constant":
        _write(path, text.replace('"step": ', '"step": NaN, "was": ', 1).encode())
    else:
        _write(path, text.encode("utf-16"))


def cases():
    """(file kind, damage) for every file kind the trainers write."""
    kinds = ["module", "state_tensors", "state_json", "metrics"]
    out = [(kind, f"any:{name}") for kind in kinds for name in ANY_FILE]
    out += [("module", f"tensor:{name}") for name in TENSOR_EDITS]
    out += [("module", "tensor:extra_key")]
    out += [("state_tensors", f"tensor:{name}@{prefix}") for prefix in STATE_PREFIXES for name in TENSOR_EDITS
            if not (name == "nan" and prefix.startswith("rng/"))]  # RNG states hold bytes: no NaN
    out += [("state_tensors", "tensor:extra_key")]
    out += [("state_json", f"json:{name}") for name in JSON_EDITS]
    out += [("metrics", "metrics:garbage_line"), ("metrics", "metrics:no_step"), ("metrics", "metrics:step_string")]
    return out


def target_files(run: Run, kind: str) -> list[str]:
    files = run.files()
    if kind == "module":
        return [f for f in files if f.endswith(".safetensors") and not f.endswith(STATE_TENSORS)]
    return [{"state_tensors": os.path.join("checkpoint", STATE_TENSORS),
             "state_json": os.path.join("checkpoint", STATE_JSON), "metrics": "metrics.jsonl"}[kind]]


def damage(path: str, how: str, run: Run) -> None:
    family, _, name = how.partition(":")
    if family == "any":
        ANY_FILE[name](path)
    elif family == "tensor":
        name, _, prefix = name.partition("@")
        if name == "extra_key":
            _edit_tensors(path, lambda t: t.__setitem__("bogus/weight", torch.zeros(2)))
        else:
            _edit_tensors(path, lambda t: TENSOR_EDITS[name](t, prefix))
    elif family == "json":
        if JSON_EDITS[name] is None:
            _damage_json_raw(path, name)
        else:
            _edit_json(path, JSON_EDITS[name])
    else:
        lines = _read(path).decode().splitlines()
        bad = {"garbage_line": "{not json", "no_step": '{"reward": 1.0}', "step_string": '{"step": "2"}'}[name]
        _write(path, "\n".join(lines[:1] + [bad] + lines[1:]).encode() + b"\n")


def damaged_copy(run: Run, rel: str, how: str, tmp_path) -> str:
    folder = str(tmp_path / "run")
    shutil.copytree(run.folder, folder, symlinks=True)
    damage(os.path.join(folder, rel), how, run)
    return folder


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
    _edit_tensors(damaged, lambda t: TENSOR_EDITS["wrong_shape"](t, "optim/"))
    before = folder_state(out)
    capsys.readouterr()
    assert main(["train", "decentralized", "--resume", "--steps", "2", "--out", out, "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and damaged in lines[0], lines
    assert folder_state(out) == before
