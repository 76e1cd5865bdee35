"""Bad command-line input: every flag of `rlkernels train` / `rlkernels demo` and every
config key of every trainer (through --set and through config files) is given values
that cannot work.  Each must end with exit code 2 and exactly one line on stderr that
names the flag, key or file, no traceback, and nothing created or changed in the run
folder.  Most cases call the CLI's main() in-process; a few run the real command."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import types
import typing

import pytest
import torch

from rlkernels import trainers
from rlkernels.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call(argv, capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit counts as a code."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def folder_state(folder) -> dict:
    out = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
            else:
                out[rel] = os.path.islink(path) or os.path.isdir(path)
    return out


def assert_one_line_refusal(code, out, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and out == "", (out, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------- every config key, through --set
def config_keys(cls, prefix=""):
    """(dotted key, annotation) of every field of a config dataclass, sections included."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        yield prefix + field.name, annotation
        if dataclasses.is_dataclass(annotation):
            yield from config_keys(annotation, prefix + field.name + ".")


def bad_values(annotation) -> list[str]:
    """--set values (JSON where they parse) that no key of this type can take."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation)
    if optional:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    values = ["[1, 2]", '{"a": 1}']
    if not optional:
        values.append("null")
    if dataclasses.is_dataclass(annotation):
        return ["3", "[1]", '"text"']
    if annotation is int:
        values += ["abc", "2.5", "true", "1e400", "NaN", "1" * 5000]
    elif annotation is float:
        values += ["abc", "NaN", "Infinity", "-Infinity", "1e999", "true", "nan"]
    elif annotation is bool:
        values += ["maybe", "2", "0.5"]
    elif annotation is str:
        values += ["5", "2.5", "true"]
    return values


@pytest.mark.parametrize("trainer", trainers.TRAINERS)
def test_every_config_key_refuses_bad_values(trainer, tmp_path, capsys):
    out = tmp_path / "run"
    failures = []
    cases = 0
    for key, annotation in config_keys(trainers.config_class(trainer)):
        for value in bad_values(annotation):
            cases += 1
            code, stdout, err = call(["train", trainer, "--out", str(out), "--set", f"{key}={value}"], capsys)
            lines = err.strip().splitlines()
            if code != 2 or len(lines) != 1 or f"config key '{key}'" not in lines[0] or stdout or out.exists():
                failures.append(f"--set {key}={value[:40]}: exit {code}, stderr {err[-300:]!r}")
    assert cases > 50
    assert not failures, "\n".join(failures[:20])


# ---------------------------------------------------------------- range checks that are not about types
RANGE_CASES = [
    ("steps=0", "steps"), ("steps=-3", "steps"), ("steps=1000000000000", "steps"),
    ("seed=-1", "seed"), (f"seed={2 ** 70}", "seed"), ("threads=-1", "threads"), ("threads=100000", "threads"),
    ("save_every=-1", "save_every"), ("lr=0", "lr"), ("lr=-1e-3", "lr"), ("gamma=1.5", "gamma"),
    ("kernels=fast", "kernels"), ("device=tpu", "device"), ("device=cuda:x", "device"), ("device=", "device"),
    ("minibatches=3", "minibatches"), ("env=pong", "env"), ("1=2", "1"), ("model.n_layer=2", "model"),
    ("stepz=3", "stepz"), ("STEPS=3", "STEPS"),
    ("num_envs=1000000000000", "num_envs"), ("hidden=100000", "hidden"), ("rollout_steps=10000000", "rollout_steps"),
    ("num_envs=1000000", "num_envs"),  # times rollout_steps 256: over the slots' limit
    ("grid_size=10000000", "grid_size"),
]


@pytest.mark.parametrize("item,key", RANGE_CASES, ids=[c[0][:30] for c in RANGE_CASES])
def test_config_values_out_of_range(item, key, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = call(["train", "ppo", "--out", str(out), "--set", item], capsys)
    assert_one_line_refusal(code, stdout, err, f"'{key}'")
    assert not out.exists()


# ---------------------------------------------------------------- every flag
def _write(path, data):
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as fh:
        fh.write(data)
    return str(path)


def flag_cases(tmp_path):
    """(argv after `train ppo` or a full argv, the text the one line must contain)."""
    cfg = tmp_path / "configs"
    cfg.mkdir()
    a_file = _write(tmp_path / "a-file", "x")
    fifo = str(tmp_path / "fifo.json")
    os.mkfifo(fifo)
    cases = [
        (["--steps", "0"], "--steps"),
        (["--steps", "-1"], "--steps"),
        (["--steps", str(10 ** 12)], "--steps"),
        (["--steps", "abc"], "--steps"),
        (["--steps", "2.5"], "--steps"),
        (["--steps"], "--steps"),
        (["--seed", str(2 ** 70)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--seed", "2**70"], "--seed"),
        (["--device", "cuda:x"], "device"),
        (["--device", "tpu"], "device"),
        (["--device", ""], "--device"),
        (["--kernels", "fast"], "--kernels"),
        (["--set", "novalue"], "novalue"),
        (["--set", "=3"], "--set"),
        (["--set", "model..n_layer=3"], "--set"),
        (["--set", "lr=NaN"], "'lr'"),
        (["--set", "lr=inf"], "'lr'"),
        (["--set", "lerning_rate=1e-3"], "'lerning_rate'"),
        (["--out", a_file], "--out"),
        (["--out", os.path.join(a_file, "run")], "--out"),
        (["--out", "/proc/rlkernels-cannot-write-here"], "--out"),
        (["--out", ""], "--out"),
        (["--resume", "--out", str(tmp_path / "no-run-here")], "--resume"),
        (["--resume", "--compare"], "--compare"),
        (["--config", str(cfg)], str(cfg)),
        (["--config", str(cfg / "missing.json")], "missing.json"),
        (["--config", ""], "--config"),
        (["--config", fifo], fifo),
        (["--config", _write(cfg / "empty.json", "")], "empty.json: is empty"),
        (["--config", _write(cfg / "blank.toml", "\n\n")], "blank.toml: is empty"),
        (["--config", _write(cfg / "empty.yaml", "")], "empty.yaml: is empty"),
        (["--config", _write(cfg / "bad.json", '{"steps": 3,')], "bad.json: is not valid JSON"),
        (["--config", _write(cfg / "bad.toml", "steps = = 3")], "bad.toml: is not valid TOML"),
        (["--config", _write(cfg / "bad.yaml", "steps: [3\nlr: 1")], "bad.yaml: is not valid YAML"),
        (["--config", _write(cfg / "u16.json", '{"steps": 3}'.encode("utf-16"))], "u16.json: is UTF-16"),
        (["--config", _write(cfg / "u16.yaml", "steps: 3".encode("utf-16"))], "u16.yaml: is UTF-16"),
        (["--config", _write(cfg / "u16.toml", "steps = 3".encode("utf-16"))], "u16.toml: is UTF-16"),
        (["--config", _write(cfg / "latin.json", b'{"env": "caf\xe9"}')], "latin.json: is not UTF-8"),
        (["--config", _write(cfg / "list.json", "[1, 2]")], "list.json: the top level must be a mapping"),
        (["--config", _write(cfg / "scalar.yaml", "3")], "scalar.yaml: the top level must be a mapping"),
        (["--config", _write(cfg / "nan.json", '{"lr": NaN}')], "nan.json: is not valid JSON"),
        (["--config", _write(cfg / "deep.json", "[" * 100000 + "]" * 100000)], "deep.json"),
        (["--config", _write(cfg / "typo.json", '{"stepz": 3}')], "'stepz'"),
        (["--config", _write(cfg / "typo.toml", "lerning_rate = 0.1\n")], "'lerning_rate'"),
        (["--config", _write(cfg / "section.yaml", "model: 3\n")], "'model'"),
        (["--config", _write(cfg / "intkey.yaml", "1: 2\n")], "'1'"),
        (["--config", _write(cfg / "big.json", " " * (2 << 20) + "{}")], "big.json: is"),
        (["--config", _write(cfg / "conf.ini", "steps=3")], "conf.ini: unknown extension"),
        (["--config", _write(cfg / "tag.yaml", "steps: !!python/object/apply:os.getcwd []\n")], "tag.yaml"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--no-progress=yes"], "--no-progress"),
        (["--compare=1"], "--compare"),
        (["--resume=x"], "--resume"),
        (["--kernels"], "--kernels"),
        (["--set"], "--set"),
        ("full", ["train"], "trainer"),
        ("full", ["train", "sac"], "sac"),
        ("full", ["demo", "--out", ""], "--out"),
        ("full", ["demo", "--no-progress=1"], "--no-progress"),
        ("full", ["train", "ppo-rlhf", "--out", str(tmp_path / "run"), "--set", f"reward={tmp_path / 'no-rm'}",
                  "--set", 'model={"n_layer": 1, "n_embd": 16, "n_head": 2, "pretrain_steps": 1}'], "no-rm"),
        ("full", ["demo", "--steps", "-1"], "--steps"),
        ("full", ["demo", "--steps", "0"], "--steps"),
        ("full", ["demo", "--steps", "x"], "--steps"),
        ("full", ["demo", "--out", a_file], "--out"),
        ("full", ["demo", "--kernels", "fast"], "--kernels"),
    ]
    odd = tmp_path / "odd-run"
    (odd / "metrics.jsonl").mkdir(parents=True)
    cases.append((["--out", str(odd)], "metrics.jsonl exists but is not a regular file"))
    if os.geteuid() != 0:  # root writes anywhere; the /proc case above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((["--out", str(locked / "run")], "is not writable"))
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "no CUDA device"), (["--device", "cuda:0"], "no CUDA device")]
    else:
        cases += [(["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device")]
    return cases


def test_every_flag_refuses_bad_values(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _write(out / "keep.txt", "a previous run's file")
    before = folder_state(tmp_path)
    failures = []
    for case in flag_cases(tmp_path):
        if case[0] == "full":
            argv, needle = case[1], case[2]
        else:
            argv, needle = case
            argv = ["train", "ppo", *argv] if "--out" in argv else ["train", "ppo", "--out", str(out), *argv]
        before = folder_state(tmp_path)
        code, stdout, err = call(argv, capsys)
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or needle not in lines[0] or "Traceback" in err or stdout:
            failures.append(f"{argv[2:] if argv[0] == 'train' else argv}: exit {code}, stderr {err[-400:]!r}")
        elif folder_state(tmp_path) != before:
            failures.append(f"{argv}: changed files under {tmp_path}")
    assert not failures, "\n".join(failures)


def test_good_flags_still_run(tmp_path, capsys):
    """The control: the same command with sane values trains (so the table tests the values)."""
    out = tmp_path / "run"
    cfg = _write(tmp_path / "c.yaml", "num_envs: 4\nrollout_steps: 8\nepochs: 1\nminibatches: 2\nplot: false\n")
    code, stdout, err = call(["train", "ppo", "--config", cfg, "--steps", "1", "--seed", str(2 ** 63 - 1),
                              "--device", "cpu", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "ppo: 1 steps" in stdout


# ---------------------------------------------------------------- the real command, a few cases
@pytest.mark.parametrize("argv,needle", [
    (["train", "ppo", "--set", "lr=NaN"], "config key 'lr': must be a finite number"),
    (["train", "ppo", "--steps", "abc"], "--steps"),
    (["train", "ppo", "--config", "."], "is a directory"),
    (["demo", "--steps", "-1"], "--steps"),
])
def test_command_line_prints_one_line(argv, needle, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "rlkernels", *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # no runs/ folder appeared


def _data_file(tmp_path, kind):
    path = str(tmp_path / f"{kind}.jsonl")
    if kind == "missing":
        return path
    if kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        content = {"empty": b"", "binary": b"\xff\xfe\x00garbage\n", "bad_json": b"{not json\n",
                   "no_key": b'{"prompt": "a"}\n', "not_string": b'{"prompt": 1, "chosen": "b", "rejected": "c"}\n'}
        with open(path, "wb") as fh:
            fh.write(content[kind])
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "empty", "binary", "bad_json", "no_key",
                                  "not_string"])
@pytest.mark.parametrize("trainer,key", [("dpo", "data"), ("grpo", "prompts")])
def test_bad_data_files_are_refused_before_the_run(trainer, key, kind, tmp_path, capsys):
    """A data file the config names is read and checked before the run starts: one line
    naming the config key and the file, exit 2, nothing written; a FIFO never blocks."""
    os.makedirs(tmp_path / "in")
    path = _data_file(tmp_path / "in", kind)
    if trainer == "grpo" and kind in ("no_key", "not_string"):
        with open(path, "wb") as fh:  # grpo needs only "prompt"
            fh.write(b'{"chosen": "a"}\n' if kind == "no_key" else b'{"prompt": 3}\n')
    out = str(tmp_path / "out")
    code, _, err = call(["train", trainer, "--steps", "1", "--out", out, "--no-progress", "--set", f"{key}={path}"],
                        capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert f"config key '{key}'" in lines[0] and path in lines[0], lines[0]
    assert not os.path.exists(out)


@pytest.mark.parametrize("item", ["timeout=0.001", "timeout=9.5"])
def test_decentralized_timeout_too_short_to_start_the_agents(item, tmp_path, capsys):
    """A timeout under MIN_TIMEOUT had passed the checks and ended in every agent being
    killed with a traceback; it is refused up front."""
    out = tmp_path / "run"
    code, stdout, err = call(["train", "decentralized", "--out", str(out), "--set", item], capsys)
    assert_one_line_refusal(code, stdout, err, "'timeout'")
    assert not out.exists()


@pytest.mark.parametrize("env", ["gym:CartPole-v1", "gym:Nope-v0"])
def test_gym_environments_are_refused_by_the_command_line(env, tmp_path, capsys):
    """A command-line run saves a checkpoint, which a gymnasium environment cannot give:
    refused up front (it had trained, then failed at the save, or raised an ImportError
    traceback without gymnasium)."""
    out = tmp_path / "run"
    code, stdout, err = call(["train", "ppo", "--out", str(out), "--steps", "1", "--set", f"env={env}"], capsys)
    assert_one_line_refusal(code, stdout, err, "'env'")
    assert "cannot be checkpointed" in err
    assert not out.exists()



@pytest.mark.parametrize("trainer,item,key", [
    ("dpo", "num_pairs=1000000000000", "num_pairs"), ("dpo", "eval_pairs=100000000", "eval_pairs"),
    ("dpo", "model.vocab_size=1000000000000", "model.vocab_size"), ("dpo", "model.n_positions=1000000000",
                                                                   "model.n_positions"),
    ("decentralized", "agents=100000", "agents"),
])
def test_sizes_a_typo_makes_huge_are_refused(trainer, item, key, tmp_path, capsys):
    """num_pairs=10**12 had hung (pairs generated one by one), vocab_size=10**12 filled
    memory, the others ended in allocation tracebacks or (agents) would start 10**5
    processes."""
    out = tmp_path / "run"
    code, stdout, err = call(["train", trainer, "--out", str(out), "--set", item], capsys)
    assert_one_line_refusal(code, stdout, err, key.split(".")[-1])
    assert not out.exists()
