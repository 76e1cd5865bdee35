"""The `rlkernels` command line: train (with --config, --set, --resume, --kernels,
--compare), bad configs exiting with a message that names the key, demo, the bench
delegation and `python -m rlkernels`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlkernels.cli import main

TINY_PPO = ["--set", "num_envs=4", "--set", "rollout_steps=16", "--set", "epochs=1", "--set", "minibatches=2",
            "--no-progress"]


def read_steps(path):
    with open(path) as fh:
        return [json.loads(line)["step"] for line in fh]


def test_train_then_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "ppo", "--steps", "2", "--out", out, *TINY_PPO]) == 0
    assert "ppo: 2 steps" in capsys.readouterr().out
    assert read_steps(os.path.join(out, "metrics.jsonl")) == [1, 2]
    # --resume takes the saved config; --steps is the step to stop at
    assert main(["train", "ppo", "--steps", "3", "--out", out, "--resume", "--no-progress"]) == 0
    assert read_steps(os.path.join(out, "metrics.jsonl")) == [1, 2, 3]
    with open(os.path.join(out, "checkpoint", "trainer_state.json")) as fh:
        state = json.load(fh)
    assert state["step"] == 3 and state["config"]["num_envs"] == 4


def test_config_file_and_reference_kernels(tmp_path):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"env": "gridworld", "num_envs": 4, "rollout_steps": 8, "minibatches": 2,
                                  "epochs": 1, "plot": False}))
    out = str(tmp_path / "grid")
    assert main(["train", "ppo", "--config", str(config), "--steps", "1", "--out", out, "--kernels", "reference",
                 "--no-progress"]) == 0
    with open(os.path.join(out, "checkpoint", "trainer_state.json")) as fh:
        saved = json.load(fh)["config"]
    assert saved["env"] == "gridworld" and saved["kernels"] == "reference"


@pytest.mark.parametrize("argv, key", [
    (["--set", "lerning_rate=1"], "lerning_rate"),
    (["--set", "minibatches=3"], "minibatches"),
    (["--set", "gamma=2"], "gamma"),
])
def test_bad_config_exits_2_naming_the_key(argv, key, tmp_path, capsys):
    assert main(["train", "ppo", "--out", str(tmp_path / "x"), *argv]) == 2
    assert f"config key '{key}'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")  # failed before anything ran


def test_bad_config_file_key(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[model]\nn_layers = 3\n")
    assert main(["train", "dpo", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "config key 'model.n_layers'" in capsys.readouterr().err
    assert main(["train", "dpo", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_unknown_trainer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "sac"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_compare_reports_both_kernel_sets(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert main(["train", "ppo", "--compare", "--steps", "2", "--out", out, *TINY_PPO]) == 0
    text = capsys.readouterr().out
    assert "reference / rlkernels" in text
    with open(os.path.join(out, "compare.json")) as fh:
        report = json.load(fh)
    assert [r["kernels"] for r in report["results"]] == ["rlkernels", "reference"]
    for result in report["results"]:
        assert len(result["step_times"]) == 2 and result["median_step_s"] > 0
        if sys.platform.startswith("linux"):
            assert result["peak_rss_mb"] > 0


def test_demo(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--steps", "2", "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "reward per step" in text and "before:" in text and "after:" in text
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000


def test_bench_is_delegated(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0 and "rlkernels bench" in capsys.readouterr().out


@pytest.mark.parametrize("unrelated", ["package", "folder"])
def test_bench_beside_an_unrelated_benchmarks_folder(unrelated, tmp_path):
    # `python -m rlkernels` puts the current directory first on sys.path, so a user's own
    # benchmarks/ (a package, or a plain folder Python takes as a namespace package) is
    # what `import benchmarks` finds there: the command must not depend on that name.
    (tmp_path / "benchmarks").mkdir()
    if unrelated == "package":
        (tmp_path / "benchmarks" / "__init__.py").write_text("RESULTS = 'not rlkernels'\n")
    else:
        (tmp_path / "benchmarks" / "notes.txt").write_text("my numbers\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "rlkernels", "bench", "--ops", "advantages", "--quick", "--out",
                           "results"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "results" / "results.json") as fh:
        report = json.load(fh)
    assert report["cases"] and {c["family"] for c in report["cases"]} == {"advantages"}


def test_no_top_level_benchmarks_package_is_installed():
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
        include = tomllib.load(fh)["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(root, include=include)
    assert "rlkernels.benchmarks" in packages
    assert all(p == "rlkernels" or p.startswith("rlkernels.") for p in packages), packages


def test_info(capsys):
    assert main(["info"]) == 0
    assert "backends" in json.loads(capsys.readouterr().out)


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "rlkernels", "train", "ppo", "--set", "lr=0"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "config key 'lr'" in proc.stderr


# A user who installed rlkernels without the `train` extra: matplotlib (or another of
# its packages) cannot be imported.  The command must stop before any work, in one
# line that names the extra, for every trainer.
_BLOCK_IMPORT = """
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("No module named " + repr(name))
        return None

sys.meta_path.insert(0, _Blocked())
from rlkernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_without(modules, argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = _BLOCK_IMPORT.format(blocked=set(modules))
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("trainer", ["ppo-rlhf", "grpo", "dpo", "ppo", "reward-model", "decentralized"])
def test_train_without_matplotlib_stops_before_work(trainer, tmp_path):
    out = tmp_path / "run"
    proc = _run_without(["matplotlib"], ["train", trainer, "--steps", "1", "--out", str(out), "--no-progress"],
                        tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"rlkernels train {trainer}: needs matplotlib")
    assert "pip install 'rlkernels[train]'" in lines[0] and "plot=false" in lines[0]
    assert not out.exists()  # nothing ran


def test_train_without_transformers_names_the_extra(tmp_path):
    proc = _run_without(["transformers", "matplotlib"], ["train", "dpo", "--out", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("rlkernels train dpo: needs transformers (the model and tokenizer), matplotlib "
                                   "(curves.png), which the train extra installs: pip install 'rlkernels[train]'")


def test_train_without_matplotlib_runs_with_plot_off(tmp_path):
    out = tmp_path / "run"
    proc = _run_without(["matplotlib"], ["train", "ppo", "--steps", "1", "--out", str(out), "--set", "plot=false",
                                         *TINY_PPO], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_steps(out / "metrics.jsonl") == [1] and not (out / "curves.png").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--device", "tpu"], "--device 'tpu': must be cpu, cuda or cuda:N"),
    (["--device", ""], "--device '': must be cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "must be cpu, cuda or cuda:N"),
    (["--device", "cuda:7"], "GPU"),
    (["--out", "FILE"], "exists and is not a directory"),
    (["--out", "FILE/sub"], "cannot be written"),
])
def test_bench_refuses_bad_flags_before_running(flags, needle, tmp_path, monkeypatch, capsys):
    """One line naming the flag, exit 2, before any benchmark runs (a bad --out had been
    found only when the results were written, after every case)."""
    from rlkernels.benchmarks.__main__ import main as bench_main

    monkeypatch.setenv("RLK_BENCH_CHILD", "1")  # no re-execution under the allocator settings
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    capsys.readouterr()
    assert bench_main(["--ops", "advantages", "--quick", *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert "advantages/" not in captured.out  # nothing ran
