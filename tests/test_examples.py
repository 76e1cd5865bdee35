"""The scripts in python/ are the "own training code" users copy: run them so they cannot rot."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compute_advantages_script(backend, capsys):
    summary = load("compute_advantages").main(["--batch", "8", "--length", "40", "--backend", backend])
    assert summary["finite"]
    assert abs(summary["advantage_mean"]) < 1e-5  # whitened over the valid tokens
    assert len(summary["grpo_advantages"]) == 8
    assert "tokens:" in capsys.readouterr().out


def test_compute_advantages_backends_agree():
    script = load("compute_advantages")
    rewards, values, mask = script.make_rollouts(8, 40)
    cpu = torch.stack(list(__import__("rlkernels").gae(rewards, values, mask, lam=0.95)))
    ref = torch.stack(list(__import__("rlkernels").gae(rewards, values, mask, lam=0.95, backend="reference")))
    torch.testing.assert_close(cpu[:, mask], ref[:, mask])
