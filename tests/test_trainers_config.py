"""Trainer machinery without training: configs (unknown keys and impossible values
name the key), config files and overrides, the kernels switch, checkpoints, plots."""
from __future__ import annotations

import json
import os

import pytest
import torch

from rlkernels import trainers
from rlkernels.trainers import checkpoint as ckpt
from rlkernels.trainers.config import ConfigError, parse_overrides, read_file
from rlkernels.trainers.kernels import Kernels


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_defaults_build(name):
    config = trainers.make_config(name)
    assert config.steps > 0
    assert trainers.make_config(name, config.to_dict()) == config  # round trip


@pytest.mark.parametrize("name", trainers.TRAINERS)
def test_unknown_key_names_it(name):
    with pytest.raises(ConfigError, match="'stepz'.*did you mean 'steps'") as info:
        trainers.make_config(name, {"stepz": 3})
    assert info.value.key == "stepz"


def test_unknown_nested_key_names_the_dotted_path():
    with pytest.raises(ConfigError, match="'model.n_hed'.*did you mean 'n_head'") as info:
        trainers.make_config("ppo-rlhf", {"model": {"n_hed": 2}})
    assert info.value.key == "model.n_hed"


@pytest.mark.parametrize("name, data, key", [
    ("ppo-rlhf", {"minibatch_size": 7}, "minibatch_size"),
    ("ppo-rlhf", {"minibatch_size": 64}, "minibatch_size"),
    ("ppo-rlhf", {"gamma": 1.5}, "gamma"),
    ("ppo-rlhf", {"clip_low": 0.0}, "clip_low"),
    ("ppo-rlhf", {"kl_estimator": "k9"}, "kl_estimator"),
    ("ppo-rlhf", {"agg": "mean"}, "agg"),
    ("ppo-rlhf", {"batch_size": 0}, "batch_size"),
    ("ppo-rlhf", {"model": {"n_head": 3}}, "model.n_embd"),
    ("ppo-rlhf", {"model": {"n_layer": 0}}, "model.n_layer"),
    ("ppo-rlhf", {"max_new_tokens": 60}, "max_new_tokens"),
    ("grpo", {"group_size": 1}, "group_size"),
    ("grpo", {"minibatch_size": 5}, "minibatch_size"),
    ("grpo", {"loss_type": "ppo"}, "loss_type"),
    ("dpo", {"kind": "kto"}, "kind"),
    ("dpo", {"beta": 0}, "beta"),
    ("dpo", {"label_smoothing": 2.0}, "label_smoothing"),
    ("reward-model", {"lr": -1}, "lr"),
    ("ppo", {"minibatches": 3}, "minibatches"),
    ("ppo", {"env": "mountaincar"}, "env"),
    ("ppo", {"env": "gridworld", "grid_size": 2}, "grid_size"),
    ("ppo", {"kernels": "fast"}, "kernels"),
    ("ppo", {"device": "tpu"}, "device"),
    ("ppo", {"steps": -1}, "steps"),
    ("ppo", {"steps": "many"}, "steps"),
    ("ppo", {"anneal_lr": "maybe"}, "anneal_lr"),
    ("decentralized", {"mode": "broadcast"}, "mode"),
    ("decentralized", {"agents": 0}, "agents"),
    ("decentralized", {"mode": "gossip", "alpha": 1.5}, "alpha"),
])
def test_impossible_values_name_the_key(name, data, key):
    with pytest.raises(ConfigError) as info:
        trainers.make_config(name, data)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_values_are_coerced_from_strings():
    config = trainers.make_config("ppo", parse_overrides(["lr=1e-3", "anneal_lr=false", "steps=7", "clip_high=null"]))
    assert (config.lr, config.anneal_lr, config.steps, config.clip_high) == (1e-3, False, 7, None)


def test_overrides_nest_and_merge_over_files(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"steps": 3, "model": {"n_layer": 3, "n_embd": 48}}))
    config = trainers.make_config("grpo", read_file(str(path)), parse_overrides(["model.n_embd=32", "beta=0"]))
    assert (config.steps, config.model.n_layer, config.model.n_embd, config.beta) == (3, 3, 32, 0.0)
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["steps"])


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text('steps = 4\nlr = 0.01\n[model]\nn_layer = 1\n')
    assert read_file(str(tmp_path / "a.toml")) == {"steps": 4, "lr": 0.01, "model": {"n_layer": 1}}
    pytest.importorskip("yaml")
    (tmp_path / "a.yaml").write_text("steps: 4\nmodel:\n  n_layer: 1\n")
    assert read_file(str(tmp_path / "a.yaml")) == {"steps": 4, "model": {"n_layer": 1}}
    (tmp_path / "a.ini").write_text("")
    with pytest.raises(ValueError, match="unknown extension"):
        read_file(str(tmp_path / "a.ini"))
    with pytest.raises(FileNotFoundError):
        read_file(str(tmp_path / "missing.json"))


def test_kernels_switch():
    import rlkernels

    with pytest.raises(ValueError, match="kernels must be one of"):
        Kernels("fast")
    fast, ref = Kernels("rlkernels"), Kernels("reference")
    assert fast.gae is rlkernels.gae
    assert ref.gae.keywords == {"backend": "reference"}
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    a_fast, _ = fast.gae(rewards, values, gamma=0.9, lam=0.8)
    a_ref, _ = ref.gae(rewards, values, gamma=0.9, lam=0.8)
    torch.testing.assert_close(a_fast, a_ref)
    with pytest.raises(AttributeError, match="no op 'no_such_op'"):
        fast.no_such_op
    assert not fast.has("no_such_op") and fast.has("gae")


def test_checkpoint_round_trip_with_tied_weights(tmp_path):
    from rlkernels.trainers import toy

    model = toy.build_model(toy.model_config(n_layer=1, n_embd=16, n_head=2), seed=3)
    tensors, aliases = ckpt.module_tensors(model)
    assert aliases == {"lm_head.weight": "transformer.wte.weight"}  # the tied matrix is stored once
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    ckpt.save(str(tmp_path / "c"), trainer="t", step=5, config={"a": 1}, modules={"m": model},
              optimizers={"o": optimizer}, extra_tensors={"x": torch.arange(3)}, extra_values={"y": [1, 2]},
              python_rng=__import__("random").Random(1).getstate(), generator=torch.Generator().manual_seed(2))
    other = toy.build_model(toy.model_config(n_layer=1, n_embd=16, n_head=2), seed=4)
    other_opt = torch.optim.Adam(other.parameters(), lr=0.5)
    state = ckpt.load(str(tmp_path / "c"), trainer="t", modules={"m": other}, optimizers={"o": other_opt},
                      generator=torch.Generator())
    assert state["step"] == 5 and state["extra_values"] == {"y": [1, 2]}
    assert torch.equal(state["extra_tensors"]["x"], torch.arange(3))
    for (ka, a), (kb, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()  # still tied
    assert other_opt.param_groups[0]["lr"] == 0.1 and isinstance(other_opt.param_groups[0]["betas"], tuple)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg"], other_opt.state[q]["exp_avg"])
    with pytest.raises(ValueError, match="written by trainer 't'"):
        ckpt.load(str(tmp_path / "c"), trainer="u", modules={}, optimizers={}, generator=None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.read_state(str(tmp_path / "nothing"))


def test_plot_writes_png(tmp_path):
    from rlkernels.trainers.plot import save_curves

    records = [{"step": i + 1, "reward": i * 0.1, "loss": 1.0 / (i + 1)} for i in range(40)]
    path = save_curves(records, str(tmp_path / "c.png"), keys=("reward", "loss", "kl"))
    assert path and os.path.getsize(path) > 1000
    assert save_curves([{"step": 1}], str(tmp_path / "none.png")) is None
