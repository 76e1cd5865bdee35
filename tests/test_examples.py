"""The standalone scripts in python/ run (tiny sizes), so they cannot rot."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "python")


def load(name: str):
    if EXAMPLES not in sys.path:  # as `python python/<name>.py` does: lm_example.py beside the script imports
        sys.path.insert(0, EXAMPLES)
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"rlkernels_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(rows):
    return all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))


def test_ppo_step(capsys):
    rows = load("ppo_step").main(["--steps", "2", "--batch", "4", "--prompt-len", "4", "--response-len", "6",
                                  "--device", "cpu"])
    assert [r["step"] for r in rows] == [1, 2] and finite(rows)
    assert "clip_frac" in capsys.readouterr().out


def test_grpo_step():
    rows = load("grpo_step").main(["--steps", "2", "--prompts", "2", "--group", "3", "--prompt-len", "4",
                                   "--response-len", "6", "--device", "cpu"])
    assert [r["step"] for r in rows] == [1, 2] and finite(rows)


def test_dpo_loop_learns_the_synthetic_preference():
    rows = load("dpo_loop").main(["--steps", "12", "--batch", "8", "--prompt-len", "4", "--completion-len", "4",
                                  "--device", "cpu"])
    assert finite(rows)
    assert rows[0]["accuracy"] == 0.0  # policy == reference: every margin is 0
    assert rows[-1]["accuracy"] > 0.9 and rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("name", ["ppo_step", "grpo_step", "dpo_loop"])
def test_scripts_document_themselves(name):
    module = load(name)
    assert module.__doc__ and "rlkernels" in module.__doc__
